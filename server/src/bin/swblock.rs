//! `swblock`: the volume server, the development master, operator commands and a local cluster.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use server::cli;

#[derive(Parser, Debug)]
#[command(
    name = "swblock",
    about = "Replicated block volumes: servers, a development master, operator commands"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a volume server.
    Volume(cli::VolumeArgs),
    /// Run the development master (a stand-in for the SeaweedFS sw-block master).
    Master(cli::MasterArgs),
    /// Operator commands against a master.
    Block {
        #[command(subcommand)]
        command: cli::BlockCommand,
    },
    /// A local cluster of processes on loopback.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Start a master and N volume servers as processes; write DIR/cluster.json.
    Up {
        /// How many volume servers.
        #[arg(long, default_value_t = 3)]
        servers: usize,
        /// Where the cluster's data, logs and cluster.json go.
        #[arg(long)]
        dir: PathBuf,
        /// Run each process in its own network namespace, names starting with this prefix
        /// (root only; a private 10.77.X.0/24 on a bridge; replication with a cluster secret).
        #[arg(long)]
        netns: Option<String>,
        /// Seconds between the volume servers' scrub passes (default: theirs, a day).
        #[arg(long)]
        scrub_interval_s: Option<u64>,
    },
    /// Stop the processes DIR/cluster.json names.
    Down {
        /// The cluster's directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Start a stopped (or killed) process of the cluster again: a volume server at its data
    /// directory, or the master at its addresses and state; updates DIR/cluster.json.
    Restart {
        /// The cluster's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The volume server to restart.
        #[arg(long, conflicts_with = "master", required_unless_present = "master")]
        server: Option<String>,
        /// Restart the master.
        #[arg(long)]
        master: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    server::logging::init();
    let r = match args.command {
        Command::Volume(a) => cli::run_volume(a),
        Command::Master(a) => cli::run_master(a),
        Command::Block { command } => cli::run_block(command),
        Command::Cluster { command } => match command {
            ClusterCommand::Up {
                servers,
                dir,
                netns,
                scrub_interval_s,
            } => server::cluster::up(&dir, servers, netns.as_deref(), scrub_interval_s).map(|c| {
                println!("{}", c.to_json_pretty());
            }),
            ClusterCommand::Down { dir } => server::cluster::down(&dir),
            ClusterCommand::Restart {
                dir,
                server,
                master,
            } => match server {
                Some(id) if !master => server::cluster::restart_server(&dir, &id).map(|e| {
                    println!("{}", serde_json::to_string(&e).unwrap_or_default());
                }),
                _ => server::cluster::restart_master(&dir).map(|c| {
                    println!("{}", c.to_json_pretty());
                }),
            },
        },
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("swblock: {e}");
            ExitCode::from(1)
        }
    }
}
