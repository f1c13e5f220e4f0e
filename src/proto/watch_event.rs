//! `keel.v1.WatchEvent`, written by hand (see `build.rs`) so that a server can send one
//! encoding of an object to every watcher. A thousand watchers of a ConfigMap then cost one
//! decode and one encode of it, not a thousand of each. On the wire it is exactly the
//! generated message; a client decodes the object into `object` as usual.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;

use crate::proto::v1::Object;

#[derive(Clone, PartialEq, Default, Debug)]
pub struct WatchEvent {
    /// ADDED, MODIFIED, DELETED or BOOKMARK.
    pub r#type: String,
    pub object: Option<Object>,
    pub resource_version: String,
    /// `object` already encoded; when set it is sent instead of `object`. Never set by
    /// decoding.
    pub encoded_object: Option<Bytes>,
}

impl WatchEvent {
    /// An event whose object was encoded once for every watcher.
    pub fn encoded(kind: &str, object: Bytes, resource_version: String) -> WatchEvent {
        WatchEvent { r#type: kind.into(), object: None, resource_version, encoded_object: Some(object) }
    }
}

impl prost::Message for WatchEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.r#type.is_empty() {
            encoding::string::encode(1, &self.r#type, buf);
        }
        match (&self.encoded_object, &self.object) {
            (Some(bytes), _) => {
                encoding::encode_key(2, WireType::LengthDelimited, buf);
                encoding::encode_varint(bytes.len() as u64, buf);
                buf.put_slice(bytes);
            }
            (None, Some(object)) => encoding::message::encode(2, object, buf),
            (None, None) => {}
        }
        if !self.resource_version.is_empty() {
            encoding::string::encode(3, &self.resource_version, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.r#type, buf, ctx),
            2 => encoding::message::merge(wire_type, self.object.get_or_insert_with(Object::default), buf, ctx),
            3 => encoding::string::merge(wire_type, &mut self.resource_version, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let mut n = 0;
        if !self.r#type.is_empty() {
            n += encoding::string::encoded_len(1, &self.r#type);
        }
        match (&self.encoded_object, &self.object) {
            (Some(bytes), _) => {
                n += encoding::key_len(2) + encoding::encoded_len_varint(bytes.len() as u64) + bytes.len()
            }
            (None, Some(object)) => n += encoding::message::encoded_len(2, object),
            (None, None) => {}
        }
        if !self.resource_version.is_empty() {
            n += encoding::string::encoded_len(3, &self.resource_version);
        }
        n
    }

    fn clear(&mut self) {
        *self = WatchEvent::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1 as pb;
    use prost::Message;

    fn config_map() -> pb::Object {
        let cm = pb::ConfigMap {
            metadata: Some(pb::ObjectMeta { name: "a".into(), resource_version: "7".into(), ..Default::default() }),
            data: [("k".to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        pb::Object { kind: Some(pb::object::Kind::ConfigMap(cm)) }
    }

    #[test]
    fn an_event_sent_pre_encoded_decodes_like_one_sent_whole() {
        let whole = WatchEvent {
            r#type: "ADDED".into(),
            object: Some(config_map()),
            resource_version: "7".into(),
            encoded_object: None,
        };
        let pre = WatchEvent::encoded("ADDED", config_map().encode_to_vec().into(), "7".into());
        assert_eq!(whole.encode_to_vec(), pre.encode_to_vec());
        assert_eq!(pre.encoded_len(), pre.encode_to_vec().len());
        let back = WatchEvent::decode(&*pre.encode_to_vec()).unwrap();
        assert_eq!(back, whole);
        let bookmark = WatchEvent { r#type: "BOOKMARK".into(), resource_version: "9".into(), ..Default::default() };
        assert_eq!(WatchEvent::decode(&*bookmark.encode_to_vec()).unwrap(), bookmark);
    }
}
