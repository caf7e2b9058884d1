//! `swblock-replicad --dir DIR --listen ADDR [--secret-file FILE] [--max-connections N] [--install-stride BYTES]`:
//! serves the replica volumes in DIR (`NAME.vol`) over the transport until killed. Prints
//! `listening on ADDR` on stdout once it accepts connections (ADDR with the real port when
//! `--listen` names port 0). Logs go to stderr (`RUST_LOG`-style level in `SWBLOCK_LOG`,
//! default `info`). The volume server of a later issue takes this role; this binary exists so
//! tests and `cargo xtask chain-test` can put replicas in another process.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use transport::net::{ReplicaServer, ServerConfig, Volumes};

const USAGE: &str = "usage: swblock-replicad --dir DIR --listen ADDR [--secret-file FILE] [--max-connections N] [--install-stride BYTES]";

struct StderrLog(log::LevelFilter);

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.0
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(
                std::io::stderr(),
                "swblock-replicad {}: {}",
                r.level(),
                r.args()
            );
        }
    }

    fn flush(&self) {}
}

fn run() -> Result<(), String> {
    let level = std::env::var("SWBLOCK_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    let logger: &'static StderrLog = Box::leak(Box::new(StderrLog(level)));
    let _ = log::set_logger(logger);
    log::set_max_level(level);

    let mut dir = None;
    let mut listen = None;
    let mut config = ServerConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--listen" => {
                let v = value()?;
                listen = Some(v.parse().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--secret-file" => {
                let path = value()?;
                let secret =
                    std::fs::read(&path).map_err(|e| format!("--secret-file {path}: {e}"))?;
                let secret = secret.trim_ascii().to_vec();
                if secret.is_empty() {
                    return Err(format!("--secret-file {path}: empty"));
                }
                config.secret = Some(secret);
            }
            "--install-stride" => {
                let v = value()?;
                config.install_stride = v
                    .parse()
                    .map_err(|e| format!("--install-stride {v}: {e}"))?;
            }
            "--max-connections" => {
                let v = value()?;
                config.max_connections = v
                    .parse()
                    .map_err(|e| format!("--max-connections {v}: {e}"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let dir = dir.ok_or_else(|| format!("--dir is required\n{USAGE}"))?;
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    if !dir.is_dir() {
        return Err(format!("--dir {}: not a directory", dir.display()));
    }
    let server = ReplicaServer::start(listen, config, Arc::new(Volumes::in_dir(dir)))
        .map_err(|e| e.to_string())?;
    println!("listening on {}", server.local_addr());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    // Serve until killed: the listener and connections run on their own threads.
    loop {
        std::thread::park();
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swblock-replicad: {e}");
            ExitCode::from(2)
        }
    }
}
