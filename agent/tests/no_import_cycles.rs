//! The agent's modules depend on each other in one direction only: no module reaches back
//! into one that depends on it. A module is a file directly under `src/` together with its
//! private children in the directory of the same name (`mirror.rs` and `mirror/*.rs`); an
//! edge is any `crate::<module>` path in its source.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `crate::name` paths in `text`, outside line comments.
fn uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = tail;
        }
    }
    out
}

#[test]
fn agent_modules_form_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("a component");
        let module = Path::new(first.as_os_str())
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .to_string();
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(uses(&text).into_iter().filter(|m| *m != module));
    }
    assert!(graph.len() > 10, "found only {:?}", graph.keys());
    let cycle = find_cycle(&graph);
    assert!(
        cycle.is_none(),
        "import cycle: {}",
        cycle.unwrap_or_default().join(" -> ")
    );
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// A cycle of `graph`, by depth-first search for a back edge.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_checker_finds_paths_and_cycles() {
    let found = uses("use crate::orders::X; // crate::ignored\nlet a = crate::link::f();");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec!["link".to_string(), "orders".to_string()]
    );
    let edge = |a: &str, b: &str| (a.to_string(), BTreeSet::from([b.to_string()]));
    let mut graph: Graph = [edge("agent", "download"), edge("download", "orders")].into();
    assert_eq!(find_cycle(&graph), None);
    graph.insert("orders".into(), BTreeSet::from(["agent".to_string()]));
    assert_eq!(
        find_cycle(&graph),
        Some(
            vec!["agent", "download", "orders", "agent"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
}
