//! Project rules enforced as code: dependency direction between the workspace crates, and the
//! engine's freedom from I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Workspace crate name -> the workspace crates it depends on (normal and build deps), read
/// from `cargo metadata`.
fn workspace_deps() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("metadata is UTF-8");
    // Parse just enough of the JSON: each package's name, then its dependencies' names and
    // kinds. A hand parser keeps serde out of the workspace.
    let mut result = BTreeMap::new();
    let members: BTreeSet<String> = [
        "swblock",
        "engine",
        "blockvol",
        "v2bridge",
        "controlbridge",
        "transport",
        "server",
        "xtask",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // Objects that start with a name: a package when "version" follows, a dependency of the
    // last package when "source" follows.
    let mut current: Option<String> = None;
    for chunk in text.split("{\"name\":\"").skip(1) {
        let name = chunk.split('"').next().unwrap_or_default().to_owned();
        let after = &chunk[name.len()..];
        if after.starts_with("\",\"version\"") {
            current = members.contains(&name).then(|| name.clone());
            if let Some(c) = &current {
                result.entry(c.clone()).or_insert_with(BTreeSet::new);
            }
        } else if after.starts_with("\",\"source\"") {
            let Some(pkg) = &current else { continue };
            let kind_dev = chunk
                .split("\"kind\":")
                .nth(1)
                .is_some_and(|k| k.starts_with("\"dev\""));
            if members.contains(&name) && !kind_dev && &name != pkg {
                result
                    .entry(pkg.clone())
                    .or_insert_with(BTreeSet::new)
                    .insert(name);
            }
        }
    }
    result
}

#[test]
fn dependencies_point_one_way() {
    let deps = workspace_deps();
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("engine", &[][..]),
        ("blockvol", &[][..]),
        ("controlbridge", &["engine"][..]),
        ("v2bridge", &["engine", "blockvol"][..]),
        ("transport", &["engine", "blockvol", "v2bridge"][..]),
        (
            "server",
            &[
                "engine",
                "blockvol",
                "v2bridge",
                "transport",
                "controlbridge",
            ][..],
        ),
    ]);
    assert!(
        deps.contains_key("engine"),
        "engine not found in metadata: {deps:?}"
    );
    // The parser must see real edges, or this test could not fail.
    assert!(
        deps.get("swblock").is_some_and(|d| d.contains("engine")),
        "metadata parse found no swblock -> engine edge: {deps:?}"
    );
    for (krate, ok) in allowed {
        let Some(have) = deps.get(krate) else {
            continue;
        };
        for d in have {
            assert!(
                ok.contains(&d.as_str()),
                "{krate} depends on {d}; allowed: {ok:?}"
            );
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn engine_performs_no_io() {
    let mut files = Vec::new();
    rust_files(&root().join("engine").join("src"), &mut files);
    assert!(files.len() > 10, "engine sources not found");
    let forbidden = [
        "std::fs",
        "std::net",
        "std::thread",
        "std::time",
        "std::process",
        "std::env",
        "std::io",
        "File::",
        "Instant::",
        "SystemTime",
        "println!",
        "eprintln!",
        "unsafe ",
    ];
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable source");
        // Unit tests may use threads to prove thread safety; only library code is checked.
        let lib_part: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for word in forbidden {
            assert!(
                !lib_part.contains(word),
                "{} uses {word}: the engine must not perform I/O or read a clock",
                f.display()
            );
        }
    }
}

#[test]
fn engine_manifest_has_no_workspace_dependencies() {
    let manifest =
        std::fs::read_to_string(root().join("engine").join("Cargo.toml")).expect("engine manifest");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .unwrap_or_default();
    for krate in [
        "blockvol",
        "v2bridge",
        "controlbridge",
        "transport",
        "swblock",
    ] {
        assert!(!deps.contains(krate), "engine depends on {krate}");
    }
}
