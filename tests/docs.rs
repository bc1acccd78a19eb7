//! The design lives in the repository: every citation of a `docs/DESIGN.md` section by the
//! code, the tests, the README or the scripts names a section that exists, and nothing cites a
//! document the repository does not have.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

use std::path::Path;

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("rs" | "md" | "py" | "sh" | "toml" | "mjs")
        ) {
            out.push(path);
        }
    }
}

#[test]
fn every_design_citation_names_a_section() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let design = std::fs::read_to_string(root.join("docs/DESIGN.md")).unwrap();
    let mut paths = vec![root.join("README.md")];
    for dir in ["src", "tests", "scripts", "config", "deploy", "docs"] {
        files(&root.join(dir), &mut paths);
    }
    let needle = "docs/DESIGN.md#";
    let mut cited = 0;
    // This file names the pattern itself, and DESIGN.md its form (`…#anchor`).
    paths.retain(|p| !p.ends_with("tests/docs.rs") && !p.ends_with("docs/DESIGN.md"));
    for path in &paths {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            !text.contains(&format!("{}{}", "SPEC ", "§")),
            "{}: cites a document outside the repository",
            path.display()
        );
        let mut rest = text.as_str();
        while let Some(at) = rest.find(needle) {
            let tail = &rest[at + needle.len()..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
                .unwrap_or(tail.len());
            let anchor = &tail[..end];
            assert!(
                design.contains(&format!("{{#{anchor}}}")),
                "{} cites docs/DESIGN.md#{anchor}, which has no such section",
                path.display()
            );
            cited += 1;
            rest = &tail[end..];
        }
    }
    assert!(cited > 30, "citations found: {cited}");
}
