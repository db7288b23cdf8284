//! Repeated keys in a JSON text. `serde_json` reads an object into a map
//! where a repeated key keeps its last value only, so a file that names a
//! tensor, or its `config`, twice would be read as one of the two without a
//! word. The readers look for repeats first and refuse them.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// The first key an object of `text` has twice, at any depth, as a dotted
/// path (`__metadata__.config`); None if there is none or `text` is not
/// JSON (the caller's own parse reports that).
pub(crate) fn repeated_key(text: &[u8]) -> Option<String> {
    serde_json::from_slice::<FirstRepeat>(text).ok()?.0
}

/// Any JSON value, reduced to the first repeated key within it.
struct FirstRepeat(Option<String>);

impl<'de> Deserialize<'de> for FirstRepeat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Walk)
    }
}

struct Walk;

impl<'de> Visitor<'de> for Walk {
    type Value = FirstRepeat;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<FirstRepeat, E> {
        Ok(FirstRepeat(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<FirstRepeat, E> {
        Ok(FirstRepeat(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<FirstRepeat, E> {
        Ok(FirstRepeat(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<FirstRepeat, E> {
        Ok(FirstRepeat(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<FirstRepeat, E> {
        Ok(FirstRepeat(None))
    }
    fn visit_unit<E>(self) -> Result<FirstRepeat, E> {
        Ok(FirstRepeat(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstRepeat, A::Error> {
        let mut first = None;
        while let Some(FirstRepeat(inner)) = seq.next_element()? {
            first = first.or(inner);
        }
        Ok(FirstRepeat(first))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstRepeat, A::Error> {
        let mut seen = HashSet::new();
        let mut first = None;
        while let Some(key) = map.next_key::<String>()? {
            let FirstRepeat(inner) = map.next_value()?;
            // In document order: a repeat inside this key's value comes first.
            first = first.or_else(|| inner.map(|k| format!("{key}.{k}")));
            if !seen.insert(key.clone()) {
                first = first.or(Some(key));
            }
        }
        Ok(FirstRepeat(first))
    }
}

#[cfg(test)]
mod tests {
    use super::repeated_key;

    #[test]
    fn the_first_repeat_is_named_by_its_path() {
        assert_eq!(
            repeated_key(br#"{"a":1,"b":{"c":[1,{"d":2}]},"e":null}"#),
            None
        );
        assert_eq!(repeated_key(br#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            repeated_key(br#"{"m":{"k":"1","k":"2"},"a":1,"a":2}"#).as_deref(),
            Some("m.k")
        );
        assert_eq!(
            repeated_key(br#"{"a":1,"a":2,"m":{"k":"1","k":"2"}}"#).as_deref(),
            Some("a")
        );
        // Inside arrays, and at the top of an array.
        assert_eq!(
            repeated_key(br#"{"l":[{"x":true},{"x":1.5,"x":-2}]}"#).as_deref(),
            Some("l.x")
        );
        assert_eq!(
            repeated_key(br#"[{"y":"s","y":"t"}]"#).as_deref(),
            Some("y")
        );
        // Not JSON: the caller's parse reports it.
        assert_eq!(repeated_key(b"{\"a\":"), None);
    }
}
