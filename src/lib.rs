//! mistguard: streaming content-safety classification for Mistral-powered applications.
//!
//! The core of the crate is transport-free: [`Engine`] holds a compiled ruleset, classifies whole
//! texts ([`Engine::classify`]) and opens [`StreamSession`]s that carry automaton state from chunk
//! to chunk. The data flow, one module per step:
//!
//! `rules` (load + validate) → `normalize` → `lang` → `scan` → `score` → `decide`
//!
//! Only `grpc` (the daemon) knows about tonic and prost.

pub mod action;
pub mod daemon;
pub mod decide;
pub mod decode;
pub mod engine;
pub mod eval;
pub mod io;
pub mod lang;
pub mod leak;
pub mod learned;
pub mod load;
pub mod moderation;
pub mod normalize;
pub mod policy;
pub mod rules;
pub mod scan;
pub mod score;
pub mod validate;
pub mod verdict;

pub use action::Action;
pub use engine::{ClassifyOptions, Direction, Engine, Hit, StepResult, StreamSession, Verdict};
pub use rules::LoadError;
