//! Kubernetes' int-or-string (`targetPort: 8080` or `targetPort: http`, `maxSurge: 25%`).
//! In JSON and YAML it is a bare number or a bare string, so its serde form is written by
//! hand; on the wire it is the protobuf message `keel.v1.IntOrString`.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct IntOrString {
    #[prost(oneof = "int_or_string::Value", tags = "1, 2")]
    pub value: Option<int_or_string::Value>,
}

pub mod int_or_string {
    #[derive(Clone, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum Value {
        #[prost(int32, tag = "1")]
        IntVal(i32),
        #[prost(string, tag = "2")]
        StrVal(String),
    }
}

impl IntOrString {
    pub fn int(v: i32) -> IntOrString {
        IntOrString { value: Some(int_or_string::Value::IntVal(v)) }
    }

    pub fn string(v: impl Into<String>) -> IntOrString {
        IntOrString { value: Some(int_or_string::Value::StrVal(v.into())) }
    }
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.value {
            Some(int_or_string::Value::IntVal(i)) => s.serialize_i32(*i),
            Some(int_or_string::Value::StrVal(v)) => s.serialize_str(v),
            None => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<IntOrString, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::int)
                    .map_err(|_| E::custom(format!("{v} is out of range for an int32")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::int)
                    .map_err(|_| E::custom(format!("{v} is out of range for an int32")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::string(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_or_string_reads_and_writes_bare_values() {
        let port: IntOrString = serde_json::from_str("8080").unwrap();
        assert_eq!(port, IntOrString::int(8080));
        let name: IntOrString = serde_json::from_str("\"http\"").unwrap();
        assert_eq!(name, IntOrString::string("http"));
        assert_eq!(serde_json::to_string(&IntOrString::string("25%")).unwrap(), "\"25%\"");
        assert!(serde_json::from_str::<IntOrString>("1.5").is_err());
        assert!(serde_json::from_str::<IntOrString>("99999999999").is_err());
    }
}
