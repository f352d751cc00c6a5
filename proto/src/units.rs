//! Human units in configuration values.
//!
//! A configuration key whose name ends in `_ms`, `_secs`, `_hours`, `_bytes` or
//! `_bytes_per_sec` takes an integer in that unit, as it always has, or a string with units:
//!
//! - durations: one or more `<number><unit>` from largest to smallest, units `d`, `h`, `m`,
//!   `s`, `ms`: `"250ms"`, `"30s"`, `"5m"`, `"1h30m"`, `"1.5s"`, `"7d"`;
//! - sizes: `<number><unit>`, units `B`; `kB` (or `KB`), `MB`, `GB`, `TB`, `PB` (powers of
//!   1000); `KiB`, `MiB`, `GiB`, `TiB`, `PiB` (powers of 1024); and Kubernetes' quantity
//!   suffixes without the `B` (`k`/`K`, `M`, `G`, `T`, `P`, `Ki`, `Mi`, `Gi`, `Ti`, `Pi`):
//!   `"100GiB"`, `"512Mi"`, `"10GB"`, `"1.5GiB"`;
//! - rates (`_bytes_per_sec`): a size, optionally followed by `/s` (`"25MiB/s"`, `"25MB"`),
//!   or bits per second, spelled out so that they cannot be taken for bytes: `bit`, `kbit`,
//!   `Mbit`, `Gbit`, `Tbit` (powers of 1000), `Kibit`, `Mibit`, `Gibit`, `Tibit`, each with
//!   an optional `/s`, or `bps`, `kbps`, `Mbps`, `Gbps`, `Tbps`: `"200Mbit/s"` is
//!   25,000,000 bytes per second.
//!
//! A string holding only digits is the bare unit (`"1048576"`, as environment variables and
//! flags give numbers). Units are case-sensitive (`m` is minutes, `M` mega; `Mb` is
//! refused rather than guessed). A decimal fraction has at most 9 digits, and the value must
//! come out whole in the key's unit (`"1.5s"` is 1500 ms but not a whole number of
//! seconds). Negative values, overflow and anything else are errors that say what is
//! accepted; the value is always stored, and printed, as the integer.
//!
//! Use with serde: `#[serde(deserialize_with = "shoal_proto::units::bytes")]`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, Visitor};

/// What a configuration number measures: its unit when written bare, and the units a
/// string may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantity {
    Milliseconds,
    Seconds,
    Hours,
    Bytes,
    BytesPerSecond,
}

/// Fraction digits kept exactly (a number is held as an integer of billionths).
const FRACTION_DIGITS: u32 = 9;
const SCALE: u128 = 10u128.pow(FRACTION_DIGITS);

/// Duration units in milliseconds, largest first.
const DURATION_UNITS: &[(&str, u128)] = &[
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

const K: u128 = 1_000;
const KI: u128 = 1_024;

/// Size units in bytes.
const SIZE_UNITS: &[(&str, u128)] = &[
    ("B", 1),
    ("kB", K),
    ("KB", K),
    ("MB", K.pow(2)),
    ("GB", K.pow(3)),
    ("TB", K.pow(4)),
    ("PB", K.pow(5)),
    ("KiB", KI),
    ("MiB", KI.pow(2)),
    ("GiB", KI.pow(3)),
    ("TiB", KI.pow(4)),
    ("PiB", KI.pow(5)),
    ("k", K),
    ("K", K),
    ("M", K.pow(2)),
    ("G", K.pow(3)),
    ("T", K.pow(4)),
    ("P", K.pow(5)),
    ("Ki", KI),
    ("Mi", KI.pow(2)),
    ("Gi", KI.pow(3)),
    ("Ti", KI.pow(4)),
    ("Pi", KI.pow(5)),
];

/// Bit-rate units in bits per second (`/s` is added below for the `bit` forms).
const BIT_UNITS: &[(&str, u128)] = &[
    ("bit", 1),
    ("kbit", K),
    ("Kbit", K),
    ("Mbit", K.pow(2)),
    ("Gbit", K.pow(3)),
    ("Tbit", K.pow(4)),
    ("Kibit", KI),
    ("Mibit", KI.pow(2)),
    ("Gibit", KI.pow(3)),
    ("Tibit", KI.pow(4)),
];

const BPS_UNITS: &[(&str, u128)] = &[
    ("bps", 1),
    ("kbps", K),
    ("Kbps", K),
    ("Mbps", K.pow(2)),
    ("Gbps", K.pow(3)),
    ("Tbps", K.pow(4)),
];

impl Quantity {
    /// The value of `text` in this quantity's unit, or an error saying what is wrong and
    /// what is accepted.
    pub fn parse(self, text: &str) -> Result<u64, String> {
        self.parse_inner(text.trim())
            .map_err(|reason| format!("{reason} in {text:?}; {}", self.help()))
    }

    /// What a value of this quantity may look like, for error messages.
    pub fn help(self) -> &'static str {
        match self {
            Quantity::Milliseconds => {
                "write an integer (milliseconds) or a duration such as \"250ms\", \"30s\", \
                 \"5m\", \"1h30m\" (units d, h, m, s, ms)"
            }
            Quantity::Seconds => {
                "write an integer (seconds) or a duration such as \"30s\", \"5m\", \"1h30m\" \
                 (units d, h, m, s)"
            }
            Quantity::Hours => {
                "write an integer (hours) or a duration such as \"12h\", \"7d\", \"1d12h\" \
                 (units d, h)"
            }
            Quantity::Bytes => {
                "write an integer (bytes) or a size such as \"512MiB\", \"10GB\", \"1.5GiB\" \
                 (units B; kB, MB, GB, TB, PB: powers of 1000; KiB, MiB, GiB, TiB, PiB: \
                 powers of 1024; or Kubernetes' k, M, G, Ki, Mi, Gi, ...)"
            }
            Quantity::BytesPerSecond => {
                "write an integer (bytes per second) or a rate such as \"25MiB/s\", \
                 \"100MB/s\", \"200Mbit/s\", \"1Gbps\" (a size with an optional /s, or bits: \
                 kbit, Mbit, Gbit, Tbit, Kibit, Mibit, Gibit with an optional /s, or kbps, \
                 Mbps, Gbps, Tbps)"
            }
        }
    }

    /// The key's unit, in the unit the tables count in (ms, bytes or bits).
    fn per_unit(self) -> u128 {
        match self {
            Quantity::Milliseconds => 1,
            Quantity::Seconds => 1_000,
            Quantity::Hours => 3_600_000,
            Quantity::Bytes => 1,
            Quantity::BytesPerSecond => 8,
        }
    }

    fn unit_name(self) -> &'static str {
        match self {
            Quantity::Milliseconds => "milliseconds",
            Quantity::Seconds => "seconds",
            Quantity::Hours => "hours",
            Quantity::Bytes => "bytes",
            Quantity::BytesPerSecond => "bytes per second",
        }
    }

    fn is_duration(self) -> bool {
        matches!(
            self,
            Quantity::Milliseconds | Quantity::Seconds | Quantity::Hours
        )
    }

    /// A unit's size in the tables' unit (ms, bytes or bits), or None if not accepted here.
    fn unit(self, name: &str) -> Option<u128> {
        let find = |table: &[(&str, u128)], name: &str| {
            table.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
        };
        match self {
            Quantity::Milliseconds | Quantity::Seconds | Quantity::Hours => {
                find(DURATION_UNITS, name)
            }
            Quantity::Bytes => find(SIZE_UNITS, name),
            Quantity::BytesPerSecond => {
                let per_sec = name.strip_suffix("/s").unwrap_or(name);
                find(SIZE_UNITS, per_sec)
                    .map(|bytes| bytes * 8)
                    .or_else(|| find(BIT_UNITS, per_sec))
                    .or_else(|| find(BPS_UNITS, name))
            }
        }
    }

    fn unknown_unit(self, unit: &str) -> String {
        let lowercase_b = unit.trim_end_matches("/s").ends_with('b');
        match self {
            Quantity::Bytes if lowercase_b => format!("unknown unit {unit:?} (bytes are B)"),
            Quantity::BytesPerSecond if lowercase_b => {
                format!("unknown unit {unit:?} (write B for bytes, or bit for bits)")
            }
            _ => format!("unknown unit {unit:?}"),
        }
    }

    fn parse_inner(self, text: &str) -> Result<u64, String> {
        if text.is_empty() {
            return Err("empty value".into());
        }
        if text.starts_with('-') {
            return Err("a negative value".into());
        }
        let parts = components(text)?;
        let mut total: u128 = 0;
        let mut previous: Option<u128> = None;
        for (number, unit) in &parts {
            let factor = if unit.is_empty() {
                if parts.len() > 1 && self.is_duration() {
                    return Err(format!(
                        "a number without a unit ({}) among others",
                        number.text
                    ));
                }
                self.per_unit()
            } else {
                self.unit(unit).ok_or_else(|| self.unknown_unit(unit))?
            };
            if previous.is_some() && !self.is_duration() {
                return Err("more than one number".into());
            }
            if previous.is_some_and(|p| factor >= p) {
                return Err("units out of order (largest first, each once)".into());
            }
            previous = Some(factor);
            let part = number
                .billionths
                .checked_mul(factor)
                .ok_or_else(too_large)?;
            total = total.checked_add(part).ok_or_else(too_large)?;
        }
        let divisor = SCALE * self.per_unit();
        if total % divisor != 0 {
            return Err(format!("not a whole number of {}", self.unit_name()));
        }
        u64::try_from(total / divisor).map_err(|_| too_large())
    }
}

fn too_large() -> String {
    format!("too large (at most {})", u64::MAX)
}

/// A decimal number as written, and its value in billionths.
struct Number<'a> {
    text: &'a str,
    billionths: u128,
}

/// `<number>[ ]<unit>` pairs, separated by optional spaces; the unit may be empty.
fn components(text: &str) -> Result<Vec<(Number<'_>, &str)>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let int_len = digits(rest);
        if int_len == 0 {
            return Err(format!("expected a number at {rest:?}"));
        }
        let mut len = int_len;
        let mut fraction = "";
        if let Some(after) = rest[int_len..].strip_prefix('.') {
            let frac_len = digits(after);
            if frac_len == 0 {
                return Err("a decimal point without digits after it".into());
            }
            if frac_len > FRACTION_DIGITS as usize {
                return Err(format!(
                    "more than {FRACTION_DIGITS} digits after the decimal point"
                ));
            }
            fraction = &after[..frac_len];
            len += 1 + frac_len;
        }
        let number_text = &rest[..len];
        let mut billionths: u128 = 0;
        for c in rest[..int_len].bytes() {
            billionths = (billionths.checked_mul(10))
                .and_then(|v| v.checked_add(u128::from(c - b'0')))
                .ok_or_else(too_large)?;
        }
        billionths = billionths.checked_mul(SCALE).ok_or_else(too_large)?;
        if !fraction.is_empty() {
            let digits: u128 = fraction.parse().map_err(|_| too_large())?;
            let scale = 10u128.pow(FRACTION_DIGITS - fraction.len() as u32);
            billionths = billionths
                .checked_add(digits * scale)
                .ok_or_else(too_large)?;
        }
        rest = rest[len..].trim_start();
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = rest[unit_len..].trim_start();
        out.push((
            Number {
                text: number_text,
                billionths,
            },
            unit,
        ));
    }
    Ok(out)
}

/// The integer types a quantity may be stored in.
pub trait Unsigned: Sized + TryFrom<u64> {
    const MAX: u64;
}

macro_rules! unsigned {
    ($($t:ty),*) => {$(
        impl Unsigned for $t {
            const MAX: u64 = <$t>::MAX as u64;
        }
    )*};
}
unsigned!(u16, u32, u64, usize);

/// Deserializes a number of milliseconds: an integer, or a duration string.
pub fn millis<'de, D: Deserializer<'de>, T: Unsigned>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(QuantityVisitor::<T>::new(Quantity::Milliseconds))
}

/// Deserializes a number of seconds: an integer, or a duration string.
pub fn secs<'de, D: Deserializer<'de>, T: Unsigned>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(QuantityVisitor::<T>::new(Quantity::Seconds))
}

/// Deserializes a number of hours: an integer, or a duration string.
pub fn hours<'de, D: Deserializer<'de>, T: Unsigned>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(QuantityVisitor::<T>::new(Quantity::Hours))
}

/// Deserializes a number of bytes: an integer, or a size string.
pub fn bytes<'de, D: Deserializer<'de>, T: Unsigned>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(QuantityVisitor::<T>::new(Quantity::Bytes))
}

/// Deserializes bytes per second: an integer, or a rate string.
pub fn bytes_per_sec<'de, D: Deserializer<'de>, T: Unsigned>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(QuantityVisitor::<T>::new(Quantity::BytesPerSecond))
}

struct QuantityVisitor<T> {
    quantity: Quantity,
    _type: PhantomData<T>,
}

impl<T: Unsigned> QuantityVisitor<T> {
    fn new(quantity: Quantity) -> Self {
        Self {
            quantity,
            _type: PhantomData,
        }
    }

    fn fit<E: de::Error>(&self, value: u64, written: &dyn fmt::Display) -> Result<T, E> {
        T::try_from(value).map_err(|_| {
            E::custom(format!(
                "{written} is too large: at most {} {}",
                T::MAX,
                self.quantity.unit_name()
            ))
        })
    }

    fn error<E: de::Error>(&self, reason: impl fmt::Display) -> E {
        E::custom(format!("{reason}; {}", self.quantity.help()))
    }
}

impl<T: Unsigned> Visitor<'_> for QuantityVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.quantity.help().trim_start_matches("write "))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.fit(v, &v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        match u64::try_from(v) {
            Ok(v) => self.fit(v, &v),
            Err(_) => Err(self.error(format_args!("{v} is negative"))),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<T, E> {
        match u64::try_from(v) {
            Ok(v) => self.fit(v, &v),
            Err(_) => Err(self.error(format_args!("{v} is {}", too_large()))),
        }
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<T, E> {
        if v < 0 {
            return Err(self.error(format_args!("{v} is negative")));
        }
        self.visit_u128(v as u128)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        // TOML and YAML writers may give `1e9` for a whole number; anything else is refused.
        if v < 0.0 {
            return Err(self.error(format_args!("{v} is negative")));
        }
        if !v.is_finite() || v.fract() != 0.0 {
            return Err(self.error(format_args!(
                "{v} is not a whole number of {}",
                self.quantity.unit_name()
            )));
        }
        if v >= 18_446_744_073_709_551_616.0 {
            return Err(self.error(format_args!("{v} is {}", too_large())));
        }
        self.fit(v as u64, &v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        let value = self.quantity.parse(v).map_err(E::custom)?;
        self.fit(value, &format_args!("{v:?} ({value})"))
    }
}

#[cfg(test)]
mod tests;
