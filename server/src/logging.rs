//! Logs to stderr, at the level in `SWBLOCK_LOG` (`error`, `warn`, `info`, `debug`, `trace`;
//! default `info`), each line naming the process.

/// Installs the logger (once; later calls do nothing).
pub fn init() {
    let level = std::env::var("SWBLOCK_LOG").unwrap_or_else(|_| "info".into());
    let _ = env_logger::Builder::new()
        .parse_filters(&level)
        .format_target(false)
        .try_init();
}
