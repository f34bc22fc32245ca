//! What `make audit` and `make iterate` ask of a run: its DuckDB views and its next iteration.

use crate::store::Store;
use crate::table::{duckdb_view, TABLES};
use std::path::Path;

/// Manifest columns, typed for DuckDB (stage-specific parts stay JSON).
const MANIFEST_COLUMNS: &str = "{stage: 'VARCHAR', version: 'INTEGER', key: 'VARCHAR', params: 'JSON', inputs: 'JSON', \
     outputs: 'JSON', seed: 'UBIGINT', device: 'VARCHAR', dtype: 'VARCHAR', wall_time_s: 'DOUBLE', metrics: 'JSON', created_by: 'VARCHAR'}";

/// SQL creating the views over one run (`run = "*"` for every run): one per table that has at
/// least one file, and `manifests` over every stage run.
pub fn views_sql(store: &Store, run: &str) -> String {
    let root = store.root().display().to_string();
    let mut sql = Vec::new();
    for def in TABLES {
        if glob_has_match(&format!("{root}/runs/{run}/{}/{}", def.dir(), def.file)) {
            let view = duckdb_view(def, &root).replace("/runs/*/", &format!("/runs/{run}/"));
            sql.push(view);
        }
    }
    let manifests = [
        format!("{root}/runs/{run}/*/manifest.json"),
        format!("{root}/runs/{run}/iter-*/*/manifest.json"),
        format!("{root}/runs/{run}/evals/*/*/manifest.json"),
    ];
    let present: Vec<String> = manifests.iter().filter(|g| glob_has_match(g)).map(|g| format!("'{g}'")).collect();
    if !present.is_empty() {
        sql.push(format!(
            "CREATE OR REPLACE VIEW manifests AS SELECT regexp_extract(filename, 'runs/([^/]+)/', 1) AS run, \
             TRY_CAST(regexp_extract(filename, '/iter-([0-9]+)/', 1) AS INTEGER) AS iteration, \
             regexp_extract(filename, '/runs/[^/]+/(.+)/manifest.json$', 1) AS slot, * EXCLUDE (filename) \
             FROM read_json([{}], columns = {MANIFEST_COLUMNS}, filename = true);",
            present.join(", ")
        ));
    }
    sql.join("\n")
}

/// Whether a glob with `*` as (the end of) whole path components matches a file.
fn glob_has_match(glob: &str) -> bool {
    fn walk(base: &Path, parts: &[&str]) -> bool {
        match parts.split_first() {
            None => base.exists(),
            Some((part, rest)) => {
                if let Some(prefix) = part.strip_suffix('*') {
                    std::fs::read_dir(base).is_ok_and(|es| {
                        es.flatten().any(|e| {
                            let name = e.file_name().to_string_lossy().to_string();
                            name.starts_with(prefix) && !name.starts_with('.') && walk(&e.path(), rest)
                        })
                    })
                } else {
                    walk(&base.join(part), rest)
                }
            }
        }
    }
    let (base, rest) = match glob.strip_prefix('/') {
        Some(rest) => (Path::new("/"), rest),
        None => (Path::new("."), glob),
    };
    walk(base, &rest.split('/').collect::<Vec<_>>())
}

/// The iteration `make iterate` runs next: the first one whose policy update has not been made,
/// or that has a damaged ref.
pub fn next_iteration(store: &Store, run: &str) -> u32 {
    // An iteration is done when its update is published and `verify --repair` marked none of
    // its refs damaged.
    let done = |n: u32| {
        let dir = store.root().join("runs").join(run).join(format!("iter-{n:04}"));
        dir.join(crate::stage::Stage::GrpoUpdate.name()).join("manifest.json").exists()
            && !crate::stage::Stage::ITERATION.iter().any(|s| dir.join(s.name()).join(crate::store::DAMAGED_MARKER).exists())
    };
    let mut n = 0;
    while done(n) {
        n += 1;
    }
    n
}
