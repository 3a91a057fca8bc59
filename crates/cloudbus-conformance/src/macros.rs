//! The case modules' shorthand: `check!` fails a case with its condition, `need!`
//! skips it naming the capability it lacks, `registry!` lists a module's cases.

/// Fails the case with the condition and a message when the condition is false.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Error::new(ErrorKind::Internal, format!("check failed: {}: {}", stringify!($cond), format!($($msg)+))));
        }
    };
}

/// Skips the case, naming the capability, when the provider lacks it.
macro_rules! need {
    ($cond:expr, $what:expr) => {
        if !$cond {
            return Ok(Outcome::Skipped($what.to_string()));
        }
    };
}

/// A case list: `registry![case_fn, ...]` makes `Case`s of the functions, named after
/// them.
macro_rules! registry {
    ($($case:ident),+ $(,)?) => {
        &[$(crate::harness::Case { name: stringify!($case), run: |h| Box::pin($case(h)) }),+]
    };
}
