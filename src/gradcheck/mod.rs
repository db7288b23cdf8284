//! The correctness oracle: reverse-mode gradients against central finite
//! differences in f64, for single ops and for the whole losses.
//!
//! - `checker`: [`check`], the directional check of any function built on a
//!   tape, and its tolerance reasoning;
//! - `ops`: the op catalogue of `dmkd gradcheck` ([`op_cases`]) and the
//!   suite runner ([`run_suite`]);
//! - `problems`: random DMKD / MGD / FGD problems ([`random_problem`]), their
//!   distance from the loss's kinks, and the whole-loss checks
//!   ([`loss_cases`], [`check_problem`]).

mod checker;
mod ops;
mod problems;

pub use checker::{ABS_NOISE_FACTOR, InputCheck, RTOL, Report, STEP, check};
pub use ops::{CaseData, Checkable, GraphFn, SuiteCase, SuiteRow, op_cases, run_suite};
pub use problems::{
    KINK_MARGIN, LossCase, LossLevel, check_problem, kink_distance, loss_cases, random_problem,
};
