//! The layout rules of the crate's sources, checked on the tree itself: no source file of `src/`
//! over 700 lines (test modules aside), no two modules that import each other, and every head
//! named by the papers' name at every layer (config, math, kernels, tests).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 700;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable folder") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect()
}

/// The module path of a file under `src/`: `backends::cpu` for `src/backends/cpu/mod.rs`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file
        .strip_prefix(src)
        .expect("under src/")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The code of a file without its comments (line comments, and so doc comments).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules a file names through `crate::` and `super::` paths (`use` lines and inline
/// paths), including those inside `{...}` groups, resolved to the longest known module path.
fn imports(module: &[String], code: &str, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    for anchor in ["crate::", "super::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(anchor) {
            let start = at + i;
            at = start + anchor.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let mut base: Vec<String> = if anchor == "super::" {
                module[..module.len().saturating_sub(1)].to_vec()
            } else {
                Vec::new()
            };
            let rest = &code[at..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            base.extend(
                path.split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string),
            );
            let mut candidates = vec![base.clone()];
            if let Some(group) = rest[path.len()..].strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let item = item.split(" as ").next().unwrap_or("").trim();
                    if !item.is_empty() && item != "self" {
                        let mut p = base.clone();
                        p.extend(item.split("::").map(str::to_string));
                        candidates.push(p);
                    }
                }
            }
            for c in candidates {
                if let Some(k) = (1..=c.len()).rev().find(|&k| known.contains(&c[..k])) {
                    let target = c[..k].to_vec();
                    if target != module {
                        out.insert(target);
                    }
                }
            }
        }
    }
    out
}

#[test]
fn architecture_no_source_file_over_700_lines() {
    let src = root().join("src");
    let long: Vec<String> = rust_files(&src)
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "tests.rs"))
        .filter_map(|f| {
            let lines = std::fs::read_to_string(&f)
                .expect("readable")
                .lines()
                .count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}

#[test]
fn architecture_no_module_imports_one_that_imports_it_back() {
    let src = root().join("src");
    let files = rust_files(&src);
    assert!(files.len() > 20, "src/ not found or nearly empty");
    let known: BTreeSet<Vec<String>> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| !m.is_empty())
        .collect();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let module = module_of(&src, f);
        if module.is_empty() || module.last().is_some_and(|m| m == "tests") {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(f).expect("readable"));
        graph.insert(module.clone(), imports(&module, &code, &known));
    }
    // A sample edge, so that a broken parser cannot pass by finding nothing.
    assert!(
        graph[&vec!["op".to_string()]].contains(&vec!["layout".to_string()]),
        "the import scan no longer sees op -> layout"
    );
    let mut mutual = Vec::new();
    for (a, targets) in &graph {
        for b in targets {
            if a < b && graph.get(b).is_some_and(|t| t.contains(a)) {
                mutual.push(format!("{} <-> {}", a.join("::"), b.join("::")));
            }
        }
    }
    assert!(
        mutual.is_empty(),
        "modules that import each other: {mutual:?}"
    );
}

#[test]
fn architecture_every_head_named_at_every_layer() {
    let root = root();
    for head in crate::common::HEADS {
        // A layer may span files (the math: the criterion and transforms, and the margins).
        for layer in [
            "src/config.rs",
            "src/math.rs src/math/margin.rs",
            "src/reference.rs",
            "kernels/heads.cuh",
            "kernels/params.cuh",
        ] {
            let text: String = layer
                .split(' ')
                .map(|f| std::fs::read_to_string(root.join(f)).expect("readable layer"))
                .collect();
            assert!(
                text.to_lowercase().contains(head),
                "{layer} does not name {head}"
            );
        }
        // Test names carry the head, so that `cargo test arcface` runs its parity,
        // finite-difference, semantics and emulated tests.
        let tests = rust_files(&root.join("tests/suite"))
            .into_iter()
            .map(|f| std::fs::read_to_string(f).expect("readable test file"))
            .collect::<String>();
        for kind in [
            "fn parity_small_heads_",
            "fn fd_every_option_",
            "fn semantics_",
        ] {
            let named = tests
                .lines()
                .any(|l| l.contains(kind) && l.contains(&format!("_{head}()")));
            assert!(named, "no test `{kind}…_{head}` in tests/suite");
        }
        assert!(
            tests.contains(&format!("parity_small_heads_{head},")),
            "no emulated kernel test named after {head} (kernels.rs)"
        );
    }
}
