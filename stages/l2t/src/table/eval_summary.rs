//! The eval_summary table: the figures of one evaluation, one row (l2t-spec section 9).

use super::{f64s, list_f32, list_field, list_u32, u32s, utf8, TableReader};
use crate::store::Staging;
use anyhow::{bail, Result};
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

pub const FILE: &str = "eval_summary.parquet";

pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new("policy", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("prompts", DataType::UInt32, false),
        Field::new("k", DataType::UInt32, false),
        Field::new("pass_at_1", DataType::Float64, false),
        Field::new("pass_at_k", DataType::Float64, false),
        Field::new("mean_tokens", DataType::Float64, false),
        Field::new("mean_tokens_correct", DataType::Float64, false),
        Field::new("format_valid_rate", DataType::Float64, false),
        Field::new("token_efficiency", DataType::Float64, false),
        list_field("budgets", DataType::UInt32),
        list_field("accuracy_at_budget", DataType::Float32),
    ])
}

/// The figures of one evaluation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub prompts: usize,
    pub k: usize,
    pub pass_at_1: f64,
    pub pass_at_k: f64,
    pub mean_tokens: f64,
    /// Mean tokens of the correct samples (0 when none is correct).
    pub mean_tokens_correct: f64,
    pub format_valid_rate: f64,
    pub accuracy_at_budget: Vec<f64>,
}

/// One evaluation's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSummaryRow {
    pub policy: String,
    pub split: String,
    pub summary: Summary,
    /// Mean tokens / the base policy's mean tokens on the same prompts and settings.
    pub token_efficiency: f64,
    pub budgets: Vec<u32>,
}

impl std::fmt::Display for EvalSummaryRow {
    /// The one line `eval` prints.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.summary;
        write!(
            f,
            "{}: pass@1 {:.3} pass@{} {:.3} tokens {:.1} (correct {:.1}) format-valid {:.3} efficiency {:.3} accuracy at budgets {:?} = {:?} (split {})",
            self.policy,
            s.pass_at_1,
            s.k,
            s.pass_at_k,
            s.mean_tokens,
            s.mean_tokens_correct,
            s.format_valid_rate,
            self.token_efficiency,
            self.budgets,
            s.accuracy_at_budget.iter().map(|a| (a * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
            self.split,
        )
    }
}

pub fn write(staging: &mut Staging, row: &EvalSummaryRow) -> Result<()> {
    let s = &row.summary;
    let accuracy: Vec<f32> = s.accuracy_at_budget.iter().map(|&a| a as f32).collect();
    let columns = vec![
        utf8([&row.policy]),
        utf8([&row.split]),
        u32s([s.prompts as u32]),
        u32s([s.k as u32]),
        f64s([s.pass_at_1]),
        f64s([s.pass_at_k]),
        f64s([s.mean_tokens]),
        f64s([s.mean_tokens_correct]),
        f64s([s.format_valid_rate]),
        f64s([row.token_efficiency]),
        list_u32(std::slice::from_ref(&row.budgets)),
        list_f32(&[accuracy]),
    ];
    super::write_table(staging, FILE, schema(), columns)
}

pub fn read(path: &Path) -> Result<EvalSummaryRow> {
    let t = TableReader::open(path)?;
    if t.rows() != 1 {
        bail!("{}: {} rows, expected one summary row", t.name, t.rows());
    }
    let accuracy = t.list_f32("accuracy_at_budget")?.remove(0);
    Ok(EvalSummaryRow {
        policy: t.str("policy")?.remove(0),
        split: t.str("split")?.remove(0),
        summary: Summary {
            prompts: t.u32("prompts")?[0] as usize,
            k: t.u32("k")?[0] as usize,
            pass_at_1: t.f64("pass_at_1")?[0],
            pass_at_k: t.f64("pass_at_k")?[0],
            mean_tokens: t.f64("mean_tokens")?[0],
            mean_tokens_correct: t.f64("mean_tokens_correct")?[0],
            format_valid_rate: t.f64("format_valid_rate")?[0],
            accuracy_at_budget: accuracy.iter().map(|&a| f64::from(a)).collect(),
        },
        token_efficiency: t.f64("token_efficiency")?[0],
        budgets: t.list_u32("budgets")?.remove(0),
    })
}
