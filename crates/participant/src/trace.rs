//! W3C trace context, by hand: the command's `traceparent` is continued as span fields and in the
//! reply's header, so a participant joins the saga's trace without pulling OpenTelemetry in.

use uuid::Uuid;

/// A parsed `traceparent` (`version-traceid-parentid-flags`, lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceParent<'a> {
    pub trace_id: &'a str,
    pub parent_id: &'a str,
    flags: &'a str,
}

fn hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl<'a> TraceParent<'a> {
    pub fn parse(text: &'a str) -> Option<TraceParent<'a>> {
        let mut parts = text.split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version ff is forbidden; a later version may add fields, version 00 may not.
        let ok = hex(version, 2)
            && version != "ff"
            && (parts.next().is_none() || version != "00")
            && hex(trace_id, 32)
            && trace_id.bytes().any(|b| b != b'0')
            && hex(parent_id, 16)
            && parent_id.bytes().any(|b| b != b'0')
            && hex(flags, 2);
        ok.then_some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The context of a new span in the same trace, child of this one: `(traceparent, span id)`.
    pub fn child(&self) -> (String, String) {
        let span_id = new_span_id();
        (
            format!("00-{}-{span_id}-{}", self.trace_id, self.flags),
            span_id,
        )
    }
}

fn new_span_id() -> String {
    let (random, _) = Uuid::new_v4().as_u64_pair();
    // All zeros is an invalid span id.
    format!("{:016x}", random.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_span() {
        let tp =
            TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        let (child, span) = tp.child();
        let parsed = TraceParent::parse(&child).unwrap();
        assert_eq!(parsed.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(parsed.parent_id, span);
        assert_ne!(span, "b7ad6b7169203331");
        assert!(child.ends_with("-01"));
    }

    #[test]
    fn invalid_contexts_are_refused() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
        assert!(
            TraceParent::parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x")
                .is_some()
        );
    }
}
