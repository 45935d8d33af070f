//! The Yocto crates include agrees with Cargo.lock: every locked crates.io crate is
//! fetched (`crate://crates.io/NAME/VERSION`) with the lock's checksum
//! (`SRC_URI[NAME-VERSION.sha256sum]`), and nothing else is. Regenerate with
//! `python3 scripts/yocto-crates.py` when this fails.

use std::collections::BTreeMap;
use std::path::Path;

const INC: &str = "yocto/meta-asb-gateway/recipes-core/asb-gateway/asb-gateway-crates.inc";
const REGISTRY: &str = "registry+https://github.com/rust-lang/crates.io-index";

type Crates = BTreeMap<(String, String), String>;

fn locked(lock_text: &str) -> Crates {
    let lock: toml::Table = toml::from_str(lock_text).expect("Cargo.lock parses");
    let mut out = Crates::new();
    for p in lock["package"].as_array().unwrap() {
        let Some(source) = p.get("source").and_then(|s| s.as_str()) else {
            continue; // the crate itself
        };
        assert_eq!(
            source, REGISTRY,
            "only crates.io crates can use crate://: {p:?}"
        );
        let s = |k: &str| p[k].as_str().unwrap().to_string();
        out.insert((s("name"), s("version")), s("checksum"));
    }
    out
}

/// The crates an include fetches and the checksums it declares, checked for agreement
/// between the two halves (every fetched crate has one checksum, and vice versa).
fn included(inc: &str) -> Result<Crates, String> {
    let mut urls = Vec::new();
    let mut sums = BTreeMap::new();
    for line in inc.lines() {
        let line = line.trim();
        // crate:// URLs wherever they stand (one per line or several in one assignment).
        for word in line.split(|c: char| c.is_whitespace() || c == '"' || c == '\\') {
            if let Some(rest) = word.strip_prefix("crate://crates.io/") {
                let (name, version) = rest
                    .split_once('/')
                    .ok_or_else(|| format!("bad crate url: {word}"))?;
                urls.push((name.to_string(), version.to_string()));
            }
        }
        if let Some(rest) = line.strip_prefix("SRC_URI[") {
            let (key, value) = rest
                .split_once("] = ")
                .ok_or_else(|| format!("bad checksum line: {line}"))?;
            let id = key
                .strip_suffix(".sha256sum")
                .ok_or_else(|| format!("not a sha256sum: {line}"))?;
            let sum = value.trim_matches('"').to_string();
            if sums.insert(id.to_string(), sum).is_some() {
                return Err(format!("checksum given twice: {id}"));
            }
        }
    }
    let mut out = Crates::new();
    for (name, version) in urls {
        let id = format!("{name}-{version}");
        let sum = sums
            .remove(&id)
            .ok_or_else(|| format!("{id} is fetched without a checksum"))?;
        if out.insert((name, version), sum).is_some() {
            return Err(format!("{id} is fetched twice"));
        }
    }
    if let Some(id) = sums.keys().next() {
        return Err(format!("checksum for {id}, which is not fetched"));
    }
    Ok(out)
}

/// Everything that differs between the lock and the include, one line each.
fn differences(lock: &Crates, inc: &Crates) -> Vec<String> {
    let mut out = Vec::new();
    for ((n, v), sum) in lock {
        match inc.get(&(n.clone(), v.clone())) {
            None => out.push(format!("missing from the include: {n} {v}")),
            Some(s) if s != sum => out.push(format!("wrong checksum for {n} {v}: {s}")),
            Some(_) => {}
        }
    }
    for (n, v) in inc.keys() {
        if !lock.contains_key(&(n.clone(), v.clone())) {
            out.push(format!("not in Cargo.lock: {n} {v}"));
        }
    }
    out
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn crates_include_matches_cargo_lock() {
    let lock = locked(&read("Cargo.lock"));
    let inc = included(&read(INC)).unwrap();
    assert!(
        lock.len() > 50,
        "suspiciously few locked crates: {}",
        lock.len()
    );
    let diff = differences(&lock, &inc);
    assert!(
        diff.is_empty(),
        "{INC} disagrees with Cargo.lock (run: python3 scripts/yocto-crates.py):\n{}",
        diff.join("\n")
    );
}

#[test]
fn the_check_catches_each_kind_of_disagreement() {
    let lock = locked(&read("Cargo.lock"));
    let inc_text = read(INC);
    let ((name, version), sum) = lock.iter().next().unwrap();
    let url = format!("crate://crates.io/{name}/{version} \\");
    let sum_line = format!("SRC_URI[{name}-{version}.sha256sum] = \"{sum}\"");
    assert!(inc_text.contains(&url) && inc_text.contains(&sum_line));

    // A locked crate missing.
    let dropped = inc_text.replace(&url, "").replace(&sum_line, "");
    let d = differences(&lock, &included(&dropped).unwrap());
    assert_eq!(
        d,
        vec![format!("missing from the include: {name} {version}")]
    );

    // A wrong version (the lock moved on).
    let bumped = inc_text
        .replace(&url, &format!("crate://crates.io/{name}/999.0.0 \\"))
        .replace(
            &sum_line,
            &format!("SRC_URI[{name}-999.0.0.sha256sum] = \"{sum}\""),
        );
    let d = differences(&lock, &included(&bumped).unwrap());
    assert_eq!(d.len(), 2, "{d:?}");

    // A wrong checksum.
    let bad = inc_text.replace(sum, &"0".repeat(64));
    let d = differences(&lock, &included(&bad).unwrap());
    assert!(d[0].starts_with("wrong checksum"), "{d:?}");

    // Something extra.
    let extra = inc_text.clone()
        + "SRC_URI += \"crate://crates.io/leftpad/1.0.0\"\nSRC_URI[leftpad-1.0.0.sha256sum] = \"00\"\n";
    let d = differences(&lock, &included(&extra).unwrap());
    assert_eq!(d, vec!["not in Cargo.lock: leftpad 1.0.0".to_string()]);

    // Half an entry.
    assert!(included(&inc_text.replace(&sum_line, "")).is_err());
}
