//! Network namespaces for a local test cluster (`swblock cluster up --netns PREFIX`, root
//! only): each process gets its own namespace, joined to the others by a veth pair on one
//! bridge, with its own address in a private /24 (`10.77.X.0/24`, X from the process ID). The
//! bridge holds `.254`, so the host (the test driving the cluster) reaches every process;
//! nothing is routed anywhere else. Faults cut links between namespaces: a host's link down
//! (packets to and from it vanish), or blackhole routes between two hosts (both directions).

use std::process::Command;

use serde::{Deserialize, Serialize};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The namespaces of one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netns {
    /// Prefix of every namespace and interface name (short: interface names hold 15 bytes).
    pub prefix: String,
    /// The first three octets of the cluster's /24.
    pub subnet: String,
    /// The hosts: `m` (the master) and `1`..`N` (server `vsN`).
    pub hosts: Vec<String>,
}

/// Runs `ip args`; an error carries its stderr.
fn ip(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

impl Netns {
    /// The host key of server `id` (`vs3` -> `3`) or of the master (`m`).
    pub fn host_of(id: &str) -> String {
        id.strip_prefix("vs").unwrap_or(id).to_owned()
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// The address of `host` (`m` is `.100`, server `N` is `.N`).
    pub fn addr(&self, host: &str) -> String {
        let last = if host == "m" { "100" } else { host };
        format!("{}.{last}", self.subnet)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    fn host_link(&self, host: &str) -> String {
        format!("{}{host}h", self.prefix)
    }

    /// Whether this machine lets us make namespaces (root, `ip` present): tries one.
    pub fn available() -> bool {
        let probe = format!("swprobe{}", std::process::id() % 100_000);
        let ok = ip(&["netns", "add", &probe]).is_ok();
        if ok {
            let _ = ip(&["netns", "del", &probe]);
        }
        ok
    }

    /// Creates the bridge and a namespace for each of `hosts`; on failure removes whatever it
    /// made.
    pub fn create(prefix: &str, hosts: &[String]) -> Result<Netns, Error> {
        if prefix.is_empty()
            || prefix.len() > 8
            || !prefix.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(format!("netns prefix {prefix:?}: 1 to 8 letters or digits").into());
        }
        let n = Netns {
            prefix: prefix.to_owned(),
            subnet: format!("10.77.{}", 20 + std::process::id() % 200),
            hosts: hosts.to_vec(),
        };
        match n.build() {
            Ok(()) => Ok(n),
            Err(e) => {
                n.destroy();
                Err(e)
            }
        }
    }

    fn build(&self) -> Result<(), Error> {
        let br = self.bridge();
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["link", "set", &br, "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", self.subnet),
            "dev",
            &br,
        ])?;
        for h in &self.hosts {
            let ns = self.ns(h);
            let link = self.host_link(h);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &link, "master", &br])?;
            ip(&["link", "set", &link, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.addr(h)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Removes the namespaces (their veth ends go with them) and the bridge; best effort.
    pub fn destroy(&self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &self.ns(h)]);
            let _ = ip(&["link", "del", &self.host_link(h)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }

    /// Takes `host`'s link down (`cut`) or up again: its packets vanish both ways.
    pub fn isolate(&self, host: &str, cut: bool) -> Result<(), Error> {
        let state = if cut { "down" } else { "up" };
        ip(&["link", "set", &self.host_link(host), state])
    }

    /// Cuts (or heals) the path between `a` and `b` in both directions with blackhole routes:
    /// each refuses to send to the other, everyone else still reaches both.
    pub fn split(&self, a: &str, b: &str, cut: bool) -> Result<(), Error> {
        let verb = if cut { "add" } else { "del" };
        for (from, to) in [(a, b), (b, a)] {
            let dest = format!("{}/32", self.addr(to));
            let r = ip(&["-n", &self.ns(from), "route", verb, "blackhole", &dest]);
            if cut {
                r?;
            }
        }
        Ok(())
    }

    /// The command prefix that runs a program in `host`'s namespace.
    pub fn exec_prefix(&self, host: &str) -> Vec<String> {
        vec!["netns".into(), "exec".into(), self.ns(host)]
    }
}
