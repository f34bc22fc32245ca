//! The episodes table: one row per episode, with the rollout's outcome repeated on each
//! (l2t-spec sections 2-3).

use super::{bools, f32s, opt_utf8, u32s, utf8, TableReader};
use crate::store::Staging;
use anyhow::Result;
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

pub const FILE: &str = "episodes.parquet";

pub const ITERATION: &str = "iteration";
pub const PROMPT_ID: &str = "prompt_id";
pub const SAMPLE_IDX: &str = "sample_idx";
pub const EPISODE_IDX: &str = "episode_idx";
pub const TOKEN_START: &str = "token_start";
pub const TOKEN_END: &str = "token_end";
pub const TEXT: &str = "text";
pub const RULE: &str = "rule";
pub const K: &str = "k";
pub const FORMAT_OK: &str = "format_ok";
pub const WELL_FORMED: &str = "well_formed";
pub const ANSWER: &str = "answer";
pub const GRADE: &str = "grade";
pub const EXCLUDED: &str = "excluded";
pub const R_OUT: &str = "r_out";

pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new(ITERATION, DataType::UInt32, false),
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(SAMPLE_IDX, DataType::UInt32, false),
        Field::new(EPISODE_IDX, DataType::UInt32, false),
        Field::new(TOKEN_START, DataType::UInt32, false),
        Field::new(TOKEN_END, DataType::UInt32, false),
        Field::new(TEXT, DataType::Utf8, false),
        Field::new(RULE, DataType::Utf8, false),
        Field::new(K, DataType::UInt32, false),
        Field::new(FORMAT_OK, DataType::Boolean, false),
        Field::new(WELL_FORMED, DataType::Boolean, false),
        Field::new(ANSWER, DataType::Utf8, true),
        Field::new(GRADE, DataType::Utf8, false),
        Field::new(EXCLUDED, DataType::Boolean, false),
        Field::new(R_OUT, DataType::Float32, false),
    ])
}

/// One episode of one rollout; the fields after `rule` describe the whole rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeRow {
    pub iteration: u32,
    pub prompt_id: String,
    pub sample_idx: u32,
    pub episode_idx: u32,
    /// Response-token span `[token_start, token_end)`.
    pub token_start: u32,
    pub token_end: u32,
    pub text: String,
    pub rule: String,
    /// K_i, episodes in this rollout.
    pub k: u32,
    pub format_ok: bool,
    pub well_formed: bool,
    pub answer: Option<String>,
    /// `correct`, `wrong` or `unparsable`.
    pub grade: String,
    /// The gold answer could not be parsed: the prompt takes no part in training.
    pub excluded: bool,
    /// Outcome reward with the format penalty added.
    pub r_out: f32,
}

pub fn write(staging: &mut Staging, rows: &[EpisodeRow]) -> Result<()> {
    let answers: Vec<Option<String>> = rows.iter().map(|r| r.answer.clone()).collect();
    let columns = vec![
        u32s(rows.iter().map(|r| r.iteration)),
        utf8(rows.iter().map(|r| &r.prompt_id)),
        u32s(rows.iter().map(|r| r.sample_idx)),
        u32s(rows.iter().map(|r| r.episode_idx)),
        u32s(rows.iter().map(|r| r.token_start)),
        u32s(rows.iter().map(|r| r.token_end)),
        utf8(rows.iter().map(|r| &r.text)),
        utf8(rows.iter().map(|r| &r.rule)),
        u32s(rows.iter().map(|r| r.k)),
        bools(rows.iter().map(|r| r.format_ok)),
        bools(rows.iter().map(|r| r.well_formed)),
        opt_utf8(&answers),
        utf8(rows.iter().map(|r| &r.grade)),
        bools(rows.iter().map(|r| r.excluded)),
        f32s(rows.iter().map(|r| r.r_out)),
    ];
    super::write_table(staging, FILE, schema(), columns)
}

pub fn read(path: &Path) -> Result<Vec<EpisodeRow>> {
    let t = TableReader::open(path)?;
    let (iterations, prompt_ids, sample_idx, episode_idx) = (t.u32(ITERATION)?, t.str(PROMPT_ID)?, t.u32(SAMPLE_IDX)?, t.u32(EPISODE_IDX)?);
    let (starts, ends, texts, rules, ks) = (t.u32(TOKEN_START)?, t.u32(TOKEN_END)?, t.str(TEXT)?, t.str(RULE)?, t.u32(K)?);
    let (format_ok, well_formed, answers) = (t.bool(FORMAT_OK)?, t.bool(WELL_FORMED)?, t.opt_str(ANSWER)?);
    let (grades, excluded, r_out) = (t.str(GRADE)?, t.bool(EXCLUDED)?, t.f32(R_OUT)?);
    Ok((0..t.rows())
        .map(|i| EpisodeRow {
            iteration: iterations[i],
            prompt_id: prompt_ids[i].clone(),
            sample_idx: sample_idx[i],
            episode_idx: episode_idx[i],
            token_start: starts[i],
            token_end: ends[i],
            text: texts[i].clone(),
            rule: rules[i].clone(),
            k: ks[i],
            format_ok: format_ok[i],
            well_formed: well_formed[i],
            answer: answers[i].clone(),
            grade: grades[i].clone(),
            excluded: excluded[i],
            r_out: r_out[i],
        })
        .collect())
}
