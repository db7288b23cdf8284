//! Worker-thread counts: what a run may ask for, checked before any thread
//! starts.
//!
//! A thread count is an input like any other. Asked for 100000 threads (by
//! `--threads` or `RAYON_NUM_THREADS`), rayon starts them until the kernel
//! refuses one more stack mapping (Linux's default `vm.max_map_count` of
//! 65530 allows about 32000), and the refused thread aborts the whole
//! process from inside the standard library: no error to return, only a
//! crash. So counts are checked here, against [`MAX_THREADS`], first.

use crate::{Error, Result};

/// The most worker threads a run may ask for. Results do not depend on the
/// count (every reduction has a fixed order), so more threads than cores
/// buys nothing; 1024 leaves room for the largest machines while staying
/// far from the mapping limit (1024 threads start in under a second on a
/// 2-core guest, 4096 in 8 s).
pub const MAX_THREADS: usize = 1024;

/// `n` when it is a usable thread count (1 to [`MAX_THREADS`]); `what`
/// names where it came from in the error.
pub fn check_count(what: &'static str, n: usize) -> Result<usize> {
    if n == 0 {
        Err(Error::arg(what, "0 threads: at least 1 is needed"))
    } else if n > MAX_THREADS {
        Err(Error::arg(
            what,
            format!("{n} threads: at most {MAX_THREADS} (results do not depend on the count)"),
        ))
    } else {
        Ok(n)
    }
}

/// A rayon pool of `n` threads, after [`check_count`].
pub fn pool(what: &'static str, n: usize) -> Result<rayon::ThreadPool> {
    let n = check_count(what, n)?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| Error::arg(what, format!("cannot start {n} threads: {e}")))
}

/// Checks a `RAYON_NUM_THREADS` value, which sizes rayon's global pool (the
/// one every computation runs on unless it installs its own). `None`
/// (unset) and `0` leave the choice to rayon (one thread per CPU); a count
/// must pass [`check_count`]; anything else is an error, where rayon would
/// silently use every CPU instead of the count that was meant.
pub fn check_rayon_num_threads(value: Option<&str>) -> Result<()> {
    const WHAT: &str = "RAYON_NUM_THREADS";
    let Some(v) = value else { return Ok(()) };
    match v.trim().parse::<usize>() {
        Ok(0) => Ok(()),
        Ok(n) => check_count(WHAT, n).map(|_| ()),
        Err(_) => Err(Error::arg(
            WHAT,
            format!("`{v}` is not a thread count (a whole number, 0 for one per CPU)"),
        )),
    }
}

/// [`check_rayon_num_threads`] on this process's environment. Call it
/// before the first parallel computation: the global pool starts then.
pub fn check_env() -> Result<()> {
    match std::env::var("RAYON_NUM_THREADS") {
        Ok(v) => check_rayon_num_threads(Some(&v)),
        Err(std::env::VarError::NotPresent) => Ok(()),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::arg(
            "RAYON_NUM_THREADS",
            format!("{v:?} is not a thread count"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_one_to_the_limit_pass_and_others_are_refused() {
        for n in [1, 2, 7, MAX_THREADS] {
            assert_eq!(check_count("t", n).unwrap(), n);
        }
        for n in [0, MAX_THREADS + 1, 100_000, usize::MAX] {
            let e = check_count("--threads", n).unwrap_err();
            assert_eq!(e.kind(), "invalid_argument", "{n}");
            assert!(e.to_string().contains("--threads"), "{e}");
        }
        let three = pool("t", 3).unwrap();
        assert_eq!(three.current_num_threads(), 3);
        assert!(pool("t", MAX_THREADS + 1).is_err());
    }

    #[test]
    fn rayon_num_threads_values() {
        for ok in [None, Some("0"), Some("1"), Some(" 7 "), Some("1024")] {
            assert!(check_rayon_num_threads(ok).is_ok(), "{ok:?}");
        }
        for bad in ["1025", "100000", "abc", "2x", "-1", "", "1.5"] {
            let e = check_rayon_num_threads(Some(bad)).unwrap_err();
            assert!(e.to_string().contains("RAYON_NUM_THREADS"), "{bad}: {e}");
        }
    }
}
