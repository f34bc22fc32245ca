//! The advantages table: one row per rollout, with per-episode rewards and per-token weights,
//! rewards and advantages as list columns (l2t-spec section 7).

use super::{bools, f64s, list_f32, list_field, u32s, utf8, TableReader};
use crate::store::Staging;
use anyhow::{bail, Result};
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;

pub const FILE: &str = "advantages.parquet";

pub const ITERATION: &str = "iteration";
pub const PROMPT_ID: &str = "prompt_id";
pub const SAMPLE_IDX: &str = "sample_idx";
pub const METHOD: &str = "method";
pub const R_EPISODE: &str = "r_episode";
pub const W: &str = "w";
pub const R_T: &str = "r_t";
pub const A_T: &str = "a_t";
pub const RBAR: &str = "rbar";
pub const A_I: &str = "a_i";
pub const N_CLIPPED: &str = "n_clipped";
pub const GUARD_BINDS: &str = "guard_binds";
pub const ZERO_STD: &str = "zero_std";
pub const EXCLUDED: &str = "excluded";

pub fn schema() -> Schema {
    Schema::new(vec![
        Field::new(ITERATION, DataType::UInt32, false),
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(SAMPLE_IDX, DataType::UInt32, false),
        Field::new(METHOD, DataType::Utf8, false),
        list_field(R_EPISODE, DataType::Float32),
        list_field(W, DataType::Float32),
        list_field(R_T, DataType::Float32),
        list_field(A_T, DataType::Float32),
        Field::new(RBAR, DataType::Float64, false),
        Field::new(A_I, DataType::Float64, false),
        Field::new(N_CLIPPED, DataType::UInt32, false),
        Field::new(GUARD_BINDS, DataType::Boolean, false),
        Field::new(ZERO_STD, DataType::Boolean, false),
        Field::new(EXCLUDED, DataType::Boolean, false),
    ])
}

/// One rollout's credit.
#[derive(Debug, Clone, PartialEq)]
pub struct AdvantageRow {
    pub iteration: u32,
    pub prompt_id: String,
    pub sample_idx: u32,
    pub method: String,
    /// `R(i,k)` per episode.
    pub r_episode: Vec<f32>,
    /// Per response token: surprise weight, token reward, token advantage.
    pub w: Vec<f32>,
    pub r_t: Vec<f32>,
    pub a_t: Vec<f32>,
    /// The rollout's reward (`l2t`: trimmed mean of `r_t`; `outcome`: `r_out`) and advantage.
    pub rbar: f64,
    pub a_i: f64,
    /// Tokens whose relative contribution was clipped at `c`.
    pub n_clipped: u32,
    /// `regularised`: `|mu_i| < rho m_i`, the rollout's mean reward is near 0.
    pub guard_binds: bool,
    /// The rollout's group had zero spread (so `A_i = 0`).
    pub zero_std: bool,
    /// The prompt's gold answer is unparsable: the rollout takes no part in the update.
    pub excluded: bool,
}

pub fn write(staging: &mut Staging, rows: &[AdvantageRow]) -> Result<()> {
    let lists = |f: fn(&AdvantageRow) -> &Vec<f32>| rows.iter().map(|r| f(r).clone()).collect::<Vec<_>>();
    let columns = vec![
        u32s(rows.iter().map(|r| r.iteration)),
        utf8(rows.iter().map(|r| &r.prompt_id)),
        u32s(rows.iter().map(|r| r.sample_idx)),
        utf8(rows.iter().map(|r| &r.method)),
        list_f32(&lists(|r| &r.r_episode)),
        list_f32(&lists(|r| &r.w)),
        list_f32(&lists(|r| &r.r_t)),
        list_f32(&lists(|r| &r.a_t)),
        f64s(rows.iter().map(|r| r.rbar)),
        f64s(rows.iter().map(|r| r.a_i)),
        u32s(rows.iter().map(|r| r.n_clipped)),
        bools(rows.iter().map(|r| r.guard_binds)),
        bools(rows.iter().map(|r| r.zero_std)),
        bools(rows.iter().map(|r| r.excluded)),
    ];
    super::write_table(staging, FILE, schema(), columns)
}

/// Reads the table, checking that the per-token lists of a row have one length.
pub fn read(path: &Path) -> Result<Vec<AdvantageRow>> {
    let t = TableReader::open(path)?;
    let (iterations, prompt_ids, sample_idx, methods) = (t.u32(ITERATION)?, t.str(PROMPT_ID)?, t.u32(SAMPLE_IDX)?, t.str(METHOD)?);
    let (r_episode, w, r_t, a_t) = (t.list_f32(R_EPISODE)?, t.list_f32(W)?, t.list_f32(R_T)?, t.list_f32(A_T)?);
    let (rbar, a_i, n_clipped, zero_std, excluded) = (t.f64(RBAR)?, t.f64(A_I)?, t.u32(N_CLIPPED)?, t.bool(ZERO_STD)?, t.bool(EXCLUDED)?);
    let guard_binds = t.bool(GUARD_BINDS)?;
    let mut rows = Vec::with_capacity(t.rows());
    for i in 0..t.rows() {
        if w[i].len() != a_t[i].len() || r_t[i].len() != a_t[i].len() {
            bail!("{}: row {i}: w, r_t and a_t have {}, {} and {} values", t.name, w[i].len(), r_t[i].len(), a_t[i].len());
        }
        rows.push(AdvantageRow {
            iteration: iterations[i],
            prompt_id: prompt_ids[i].clone(),
            sample_idx: sample_idx[i],
            method: methods[i].clone(),
            r_episode: r_episode[i].clone(),
            w: w[i].clone(),
            r_t: r_t[i].clone(),
            a_t: a_t[i].clone(),
            rbar: rbar[i],
            a_i: a_i[i],
            n_clipped: n_clipped[i],
            guard_binds: guard_binds[i],
            zero_std: zero_std[i],
            excluded: excluded[i],
        });
    }
    Ok(rows)
}
