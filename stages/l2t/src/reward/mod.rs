//! Rewards: episode segmentation and the outcome reward (l2t-spec sections 2-3).

pub mod segment;
