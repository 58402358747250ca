//! Key shards: `backfill run --shard I/N` splits one backfill into N
//! independent runs (Airflow's dynamic task mapping, Kubernetes jobs), each
//! committing its own run, whose outputs together are the unsharded run's,
//! event by event.
//!
//! The hash is documented and stable across versions and machines, so that
//! a user can tell which shard a key belongs to (`backfill_shard(key, N)`
//! in `backfill sql`): FNV-1a, 64 bits, over the UTF-8 bytes, modulo N.
//!
//! - A key belongs to shard `fnv1a64(key) mod N`: its gaps and conflicts
//!   are that shard's.
//! - An event belongs to the shard of its key; without a key, to
//!   `fnv1a64(event_id) mod N`. Each row counts by its key, or by the
//!   event id where it has none; rows of one event that land in different
//!   shards (keys that differ, or a key on some rows only: an anomaly) make
//!   it the lowest of their shards', so that exactly one shard decides it.
//!
//! Every shard still reads the narrow columns of the whole window (a
//! shard cannot know an event's rows without them); what is split is the
//! work per event: the payloads read back, the replays and dead letters
//! written, the Kafka produce, and the memory of the unresolved events.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow::array::{Array, AsArray, UInt32Array};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The most shards one backfill splits into.
pub const MAX_SHARDS: u32 = 65_536;

/// Shard `index` of `count` (`--shard I/N`, 0 ≤ I < N).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// The suffix of a shard's run id: `-shard-I-of-N`.
    pub fn run_id_suffix(&self) -> String {
        format!("-shard-{}-of-{}", self.index, self.count)
    }

    /// The shard `value` (a key, or an event id) belongs to.
    pub fn of(&self, value: &[u8]) -> u32 {
        shard_of(value, self.count)
    }

    /// `value` belongs to this shard.
    pub fn holds(&self, value: &[u8]) -> bool {
        self.of(value) == self.index
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    /// `I/N`: the message says what is wrong with it.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}' is not I/N (e.g. 0/4: the first of four shards)"))?;
        // Plain ASCII digits: no sign, space or other script's digits.
        let num = |t: &str, what: &str| {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("'{s}': the {what} '{t}' is not a whole number"));
            }
            t.parse::<u32>()
                .map_err(|_| format!("'{s}': the {what} '{t}' is too large"))
        };
        let (index, count) = (num(i, "shard index")?, num(n, "shard count")?);
        if count == 0 || count > MAX_SHARDS {
            return Err(format!(
                "'{s}': the shard count must be between 1 and {MAX_SHARDS}"
            ));
        }
        if index >= count {
            return Err(format!(
                "'{s}': the shard index counts from 0, so it must be below {count} (0..={})",
                count - 1
            ));
        }
        Ok(Shard { index, count })
    }
}

/// FNV-1a, 64 bits: the shards' documented hash.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shard of `value` among `count`.
pub fn shard_of(value: &[u8], count: u32) -> u32 {
    (fnv1a64(value) % u64::from(count.max(1))) as u32
}

/// `backfill_shard(value, n)`: the shard of a key (or event id) among `n`,
/// as `--shard` computes it; NULL for a NULL value.
pub fn udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(ShardUdf {
        signature: Signature::any(2, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ShardUdf {
    signature: Signature,
}

impl ScalarUDFImpl for ShardUdf {
    fn name(&self) -> &str {
        "backfill_shard"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt32)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let count = match &args.args[1] {
            ColumnarValue::Scalar(v) if v.data_type().is_integer() => {
                match v.cast_to(&DataType::Int64)? {
                    ScalarValue::Int64(Some(n)) if n >= 1 && n <= i64::from(MAX_SHARDS) => n as u32,
                    other => {
                        return Err(DataFusionError::Execution(format!(
                            "backfill_shard(value, n): n must be a number of shards from 1 to {MAX_SHARDS}, not {other}"
                        )));
                    }
                }
            }
            _ => {
                return Err(DataFusionError::Execution(
                    "backfill_shard(value, n): n must be a whole number, a constant".into(),
                ));
            }
        };
        let values = args.args[0].clone().into_array(args.number_rows)?;
        let text = cast(&values, &DataType::Utf8)?;
        let text = text.as_string::<i32>();
        let out: UInt32Array = (0..text.len())
            .map(|i| {
                text.is_valid(i)
                    .then(|| shard_of(text.value(i).as_bytes(), count))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_64() {
        // The published test vectors of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            shard_of(b"foobar", 4),
            (0x8594_4171_f739_67e8u64 % 4) as u32
        );
    }

    #[test]
    fn shards_parse_and_refuse() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        assert_eq!(
            "0/1".parse::<Shard>().unwrap().run_id_suffix(),
            "-shard-0-of-1"
        );
        for (bad, says) in [
            ("4/4", "below 4"),
            ("0/0", "between 1 and"),
            ("1", "not I/N"),
            ("a/4", "'a' is not a whole number"),
            ("-1/4", "not a whole number"),
            ("0/65537", "between 1 and 65536"),
            (" 1/2", "' 1' is not a whole number"),
            ("+1/2", "not a whole number"),
            ("0/4294967296", "'4294967296' is too large"),
        ] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn every_value_has_one_shard() {
        let s = |i| Shard { index: i, count: 3 };
        for k in ["", "k1", "k2", "ünïcode", "a/b@c"] {
            let holders = (0..3).filter(|i| s(*i).holds(k.as_bytes())).count();
            assert_eq!(holders, 1, "{k}");
        }
    }
}
