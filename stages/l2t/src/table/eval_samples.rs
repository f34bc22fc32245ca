//! The eval_samples table: every sample of one evaluation (l2t-spec section 9).

use super::{bools, list_field, list_u32, opt_utf8, u32s, utf8, TableReader};
use crate::store::Staging;
use anyhow::Result;
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

pub const FILE: &str = "eval_samples.parquet";

pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new("policy", DataType::Utf8, false),
        Field::new("split", DataType::Utf8, false),
        Field::new("prompt_id", DataType::Utf8, false),
        Field::new("sample_idx", DataType::UInt32, false),
        Field::new("n_tokens", DataType::UInt32, false),
        Field::new("finish_reason", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, true),
        Field::new("grade", DataType::Utf8, false),
        Field::new("correct", DataType::Boolean, false),
        Field::new("format_valid", DataType::Boolean, false),
        list_field("correct_at_budget", DataType::UInt32),
    ])
}

/// One sample of one prompt under the evaluated policy.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalSampleRow {
    /// `base` or `iter-NNNN` (the policy that iteration's update produced).
    pub policy: String,
    pub split: String,
    pub prompt_id: String,
    pub sample_idx: u32,
    pub n_tokens: u32,
    pub finish_reason: String,
    pub text: String,
    pub answer: Option<String>,
    pub grade: String,
    pub correct: bool,
    pub format_valid: bool,
    /// 1 where the sample is correct when cut at that budget (eval.budgets order).
    pub correct_at_budget: Vec<u32>,
}

pub fn write(staging: &mut Staging, rows: &[EvalSampleRow]) -> Result<()> {
    let answers: Vec<Option<String>> = rows.iter().map(|r| r.answer.clone()).collect();
    let budgets: Vec<Vec<u32>> = rows.iter().map(|r| r.correct_at_budget.clone()).collect();
    let columns = vec![
        utf8(rows.iter().map(|r| &r.policy)),
        utf8(rows.iter().map(|r| &r.split)),
        utf8(rows.iter().map(|r| &r.prompt_id)),
        u32s(rows.iter().map(|r| r.sample_idx)),
        u32s(rows.iter().map(|r| r.n_tokens)),
        utf8(rows.iter().map(|r| &r.finish_reason)),
        utf8(rows.iter().map(|r| &r.text)),
        opt_utf8(&answers),
        utf8(rows.iter().map(|r| &r.grade)),
        bools(rows.iter().map(|r| r.correct)),
        bools(rows.iter().map(|r| r.format_valid)),
        list_u32(&budgets),
    ];
    super::write_table(staging, FILE, schema(), columns)
}

pub fn read(path: &Path) -> Result<Vec<EvalSampleRow>> {
    let t = TableReader::open(path)?;
    let (policy, split, prompt_id, sample_idx) = (t.str("policy")?, t.str("split")?, t.str("prompt_id")?, t.u32("sample_idx")?);
    let (n_tokens, finish, text, answer) = (t.u32("n_tokens")?, t.str("finish_reason")?, t.str("text")?, t.opt_str("answer")?);
    let (grade, correct, format_valid, budgets) =
        (t.str("grade")?, t.bool("correct")?, t.bool("format_valid")?, t.list_u32("correct_at_budget")?);
    Ok((0..t.rows())
        .map(|i| EvalSampleRow {
            policy: policy[i].clone(),
            split: split[i].clone(),
            prompt_id: prompt_id[i].clone(),
            sample_idx: sample_idx[i],
            n_tokens: n_tokens[i],
            finish_reason: finish[i].clone(),
            text: text[i].clone(),
            answer: answer[i].clone(),
            grade: grade[i].clone(),
            correct: correct[i],
            format_valid: format_valid[i],
            correct_at_budget: budgets[i].clone(),
        })
        .collect())
}
