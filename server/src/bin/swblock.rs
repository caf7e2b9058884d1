//! `swblock`: the volume server, the development master, operator commands and a local cluster.

use std::process::ExitCode;

const USAGE: &str = "usage: swblock <volume|master|block|cluster> ...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
