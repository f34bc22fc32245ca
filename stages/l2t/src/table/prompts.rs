//! The prompts table: one row per problem (design.md, "Tables").

use super::{opt_utf8, u32s, utf8, TableReader};
use crate::store::Staging;
use anyhow::Result;
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

/// Train split written by `prepare`.
pub const TRAIN_FILE: &str = "train.parquet";
/// Validation split written by `prepare`.
pub const EVAL_FILE: &str = "eval.parquet";
/// Test split written by `prepare` (when `task.n_test > 0`), for the pre-registered comparison.
pub const TEST_FILE: &str = "test.parquet";
/// The prompts of one iteration, written by `sample`.
pub const ITERATION_FILE: &str = "prompts.parquet";

pub const PROMPT_ID: &str = "prompt_id";
pub const DATA_SOURCE: &str = "data_source";
pub const SPLIT: &str = "split";
pub const PROMPT: &str = "prompt";
pub const GOLD_ANSWER: &str = "gold_answer";
pub const SOLUTION: &str = "solution";
pub const N_STEPS: &str = "n_steps";
pub const N_REDUNDANT: &str = "n_redundant";
pub const N_HARD: &str = "n_hard";

pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(DATA_SOURCE, DataType::Utf8, false),
        Field::new(SPLIT, DataType::Utf8, false),
        Field::new(PROMPT, DataType::Utf8, false),
        Field::new(GOLD_ANSWER, DataType::Utf8, false),
        Field::new(SOLUTION, DataType::Utf8, true),
        Field::new(N_STEPS, DataType::UInt32, false),
        Field::new(N_REDUNDANT, DataType::UInt32, false),
        Field::new(N_HARD, DataType::UInt32, false),
    ])
}

/// One problem. `solution` is a worked solution in the episode format, when the source has one.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub prompt_id: String,
    pub data_source: String,
    pub split: String,
    pub prompt: String,
    pub gold_answer: String,
    pub solution: Option<String>,
    /// Reasoning steps the problem needs.
    pub n_steps: u32,
    /// Filler episodes in the worked solution (checks; `decompose`: also splits of easy steps).
    pub n_redundant: u32,
    /// `decompose`: hard steps, the difficulty tier (0 elsewhere).
    pub n_hard: u32,
}

pub fn write(staging: &mut Staging, file: &str, rows: &[PromptRow]) -> Result<()> {
    super::write_table(staging, file, schema(), columns(rows))
}

/// Writes prompts to a plain path (the benchmark tables of `make data`).
pub fn write_at(path: &Path, rows: &[PromptRow]) -> Result<()> {
    super::write_table_at(path, schema(), columns(rows))
}

fn columns(rows: &[PromptRow]) -> Vec<arrow::array::ArrayRef> {
    let solutions: Vec<Option<String>> = rows.iter().map(|r| r.solution.clone()).collect();
    vec![
        utf8(rows.iter().map(|r| &r.prompt_id)),
        utf8(rows.iter().map(|r| &r.data_source)),
        utf8(rows.iter().map(|r| &r.split)),
        utf8(rows.iter().map(|r| &r.prompt)),
        utf8(rows.iter().map(|r| &r.gold_answer)),
        opt_utf8(&solutions),
        u32s(rows.iter().map(|r| r.n_steps)),
        u32s(rows.iter().map(|r| r.n_redundant)),
        u32s(rows.iter().map(|r| r.n_hard)),
    ]
}

pub fn read(path: &Path) -> Result<Vec<PromptRow>> {
    let t = TableReader::open(path)?;
    let (ids, sources, splits, prompts, golds) =
        (t.str(PROMPT_ID)?, t.str(DATA_SOURCE)?, t.str(SPLIT)?, t.str(PROMPT)?, t.str(GOLD_ANSWER)?);
    let (solutions, steps, redundant) = (t.opt_str(SOLUTION)?, t.u32(N_STEPS)?, t.u32(N_REDUNDANT)?);
    // Benchmark tables written by `make data` before the column existed have no tiers.
    let hard = if t.has(N_HARD) { t.u32(N_HARD)? } else { vec![0; t.rows()] };
    Ok((0..t.rows())
        .map(|i| PromptRow {
            prompt_id: ids[i].clone(),
            data_source: sources[i].clone(),
            split: splits[i].clone(),
            prompt: prompts[i].clone(),
            gold_answer: golds[i].clone(),
            solution: solutions[i].clone(),
            n_steps: steps[i],
            n_redundant: redundant[i],
            n_hard: hard[i],
        })
        .collect())
}
