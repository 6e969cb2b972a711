//! Writing to stdout without panicking: `println!` panics when stdout is a closed pipe
//! (`moe check tests/golden | head -1`); these return the error instead, which `main`
//! treats as the reader having had enough.

use std::io::Write;

/// Writes one line to stdout.
pub fn line(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")
}

/// `println!` that returns an error instead of panicking.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {
        $crate::output::line(format_args!($($t)*))
    };
}
