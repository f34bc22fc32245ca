//! The episode_rewards table: per episode, the fitting information gain and the compression
//! penalty (l2t-spec sections 4-5). `alpha` and `beta` are applied later, in `credit-assign`.

use super::{f64s, u32s, utf8, TableReader};
use crate::store::Staging;
use anyhow::Result;
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

pub const FILE: &str = "episode_rewards.parquet";

pub const ITERATION: &str = "iteration";
pub const PROMPT_ID: &str = "prompt_id";
pub const SAMPLE_IDX: &str = "sample_idx";
pub const EPISODE_IDX: &str = "episode_idx";
pub const J_BEFORE: &str = "j_before";
pub const J_AFTER: &str = "j_after";
pub const D_I: &str = "d_i";
pub const G_DOT_D: &str = "g_dot_d";
pub const C_RAW: &str = "c_raw";
pub const C_SCALED: &str = "c_scaled";
pub const ESTIMATOR: &str = "estimator";

pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new(ITERATION, DataType::UInt32, false),
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(SAMPLE_IDX, DataType::UInt32, false),
        Field::new(EPISODE_IDX, DataType::UInt32, false),
        Field::new(J_BEFORE, DataType::Float64, false),
        Field::new(J_AFTER, DataType::Float64, false),
        Field::new(D_I, DataType::Float64, false),
        Field::new(G_DOT_D, DataType::Float64, false),
        Field::new(C_RAW, DataType::Float64, false),
        Field::new(C_SCALED, DataType::Float64, false),
        Field::new(ESTIMATOR, DataType::Utf8, false),
    ])
}

/// One episode's information gain and penalty.
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeRewardRow {
    pub iteration: u32,
    pub prompt_id: String,
    pub sample_idx: u32,
    pub episode_idx: u32,
    /// `J(i,k-1)`: P(gold answer) with the reasoning cut before this episode.
    pub j_before: f64,
    /// `J(i,k)`: cut after it.
    pub j_after: f64,
    /// `dI(i,k) = j_after - j_before`.
    pub d_i: f64,
    /// `g(i,k) . D~`.
    pub g_dot_d: f64,
    /// `C(i,k)` as computed, and divided by the batch median of the nonzero values.
    pub c_raw: f64,
    pub c_scaled: f64,
    pub estimator: String,
}

pub fn write(staging: &mut Staging, rows: &[EpisodeRewardRow]) -> Result<()> {
    let columns = vec![
        u32s(rows.iter().map(|r| r.iteration)),
        utf8(rows.iter().map(|r| &r.prompt_id)),
        u32s(rows.iter().map(|r| r.sample_idx)),
        u32s(rows.iter().map(|r| r.episode_idx)),
        f64s(rows.iter().map(|r| r.j_before)),
        f64s(rows.iter().map(|r| r.j_after)),
        f64s(rows.iter().map(|r| r.d_i)),
        f64s(rows.iter().map(|r| r.g_dot_d)),
        f64s(rows.iter().map(|r| r.c_raw)),
        f64s(rows.iter().map(|r| r.c_scaled)),
        utf8(rows.iter().map(|r| &r.estimator)),
    ];
    super::write_table(staging, FILE, schema(), columns)
}

/// Reads the table; NaN or infinity in any reward column is refused with its row.
pub fn read(path: &Path) -> Result<Vec<EpisodeRewardRow>> {
    let t = TableReader::open(path)?;
    let (iterations, prompt_ids, sample_idx, episode_idx) = (t.u32(ITERATION)?, t.str(PROMPT_ID)?, t.u32(SAMPLE_IDX)?, t.u32(EPISODE_IDX)?);
    let (j_before, j_after, d_i, g_dot_d) = (t.f64(J_BEFORE)?, t.f64(J_AFTER)?, t.f64(D_I)?, t.f64(G_DOT_D)?);
    let (c_raw, c_scaled, estimator) = (t.f64(C_RAW)?, t.f64(C_SCALED)?, t.str(ESTIMATOR)?);
    Ok((0..t.rows())
        .map(|i| EpisodeRewardRow {
            iteration: iterations[i],
            prompt_id: prompt_ids[i].clone(),
            sample_idx: sample_idx[i],
            episode_idx: episode_idx[i],
            j_before: j_before[i],
            j_after: j_after[i],
            d_i: d_i[i],
            g_dot_d: g_dot_d[i],
            c_raw: c_raw[i],
            c_scaled: c_scaled[i],
            estimator: estimator[i].clone(),
        })
        .collect())
}
