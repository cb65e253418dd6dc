//! Sans-IO codec for the Postfix policy delegation protocol.
//!
//! A request is a block of `name=value` lines, each ending in LF (a CR before
//! the LF is stripped), closed by an empty line. The reply is
//! `action=<ACTION>` followed by an empty line. See Postfix's
//! SMTPD_POLICY_README.
//!
//! The parser works on a caller-owned byte buffer and never allocates: a
//! [`PolicyRequest`] borrows the values it needs from that buffer. It is
//! incremental — bytes already scanned are not scanned again when more arrive —
//! and it enforces hard bounds ([`Bounds`]): a line longer than
//! `max_line_len`, a request larger than `max_request_len` or with more than
//! `max_attributes` attributes is an error as soon as it is seen, so the caller
//! never has to buffer more than one bounded request.
//!
//! Invariants:
//! - a name is split from its value at the **first** `=`; values may hold `=`;
//! - unknown attributes are ignored, a repeated attribute's last value wins;
//! - only the values the daemon uses must be UTF-8.
//!
//! ```
//! use ratelimit_policyd::protocol::{encode_action, Parser};
//!
//! let mut parser = Parser::default();
//! let bytes = b"request=smtpd_access_policy\r\nsasl_username=alice@example.com\n\nnext";
//! let (request, len) = parser.parse(bytes).unwrap().expect("a whole request");
//! assert_eq!(request.sasl_username, "alice@example.com");
//! assert_eq!(&bytes[len..], b"next"); // the start of the next request
//!
//! let mut reply = Vec::new();
//! encode_action("DUNNO", &mut reply);
//! assert_eq!(reply, b"action=DUNNO\n\n");
//! ```

use std::fmt;

/// Hard limits on what one request may be. The defaults are SPEC §2's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Longest line, in bytes, not counting the line end.
    pub max_line_len: usize,
    /// Largest request, in bytes, including line ends and the closing empty line.
    pub max_request_len: usize,
    /// Most `name=value` lines in one request.
    pub max_attributes: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_line_len: 8 * 1024,
            max_request_len: 64 * 1024,
            max_attributes: 256,
        }
    }
}

/// Why a request was refused. The connection that sent it is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A line exceeded [`Bounds::max_line_len`].
    #[error("line longer than {limit} bytes")]
    LineTooLong {
        /// The bound that was exceeded.
        limit: usize,
    },
    /// The request exceeded [`Bounds::max_request_len`].
    #[error("request larger than {limit} bytes")]
    RequestTooLarge {
        /// The bound that was exceeded.
        limit: usize,
    },
    /// The request had more than [`Bounds::max_attributes`] lines.
    #[error("more than {limit} attributes in one request")]
    TooManyAttributes {
        /// The bound that was exceeded.
        limit: usize,
    },
    /// A non-empty line without `=`.
    #[error("malformed line without '=' (line {line} of the request)")]
    MissingEquals {
        /// 1-based number of the offending line within its request.
        line: usize,
    },
    /// The Perl daemon's `printshm` command. Counters are never shown on the
    /// policy port (any client of it would see every sender).
    #[error(
        "\"printshm\" is the Perl daemon's cache dump; this daemon shows its counters with \
         `ratelimit-policyd status` (on the control socket), never on the policy port"
    )]
    Printshm,
    /// A value the daemon uses was not valid UTF-8.
    #[error("attribute {name} is not valid UTF-8")]
    InvalidUtf8 {
        /// The attribute's name.
        name: &'static str,
    },
}

/// The attributes of one policy request that the daemon uses, borrowed from the
/// read buffer. Missing attributes are empty strings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyRequest<'a> {
    /// `request`: must be `smtpd_access_policy` for a policy decision.
    pub request: &'a str,
    /// `protocol_state`: RCPT, MAIL, DATA, END-OF-MESSAGE, ...
    pub protocol_state: &'a str,
    /// `sasl_username`: the login; empty without SMTP AUTH.
    pub sasl_username: &'a str,
    /// `sasl_method`: for the log line.
    pub sasl_method: &'a str,
    /// `client_name`: for the log line.
    pub client_name: &'a str,
    /// `client_address`: for the log line.
    pub client_address: &'a str,
    /// `queue_id`: for the log line; empty before the queue file exists.
    pub queue_id: &'a str,
    /// `sender`: the envelope sender.
    pub sender: &'a str,
    /// `recipient`: the RCPT TO address at RCPT stage.
    pub recipient: &'a str,
    /// `recipient_count`: accepted recipients, meaningful at DATA and END-OF-MESSAGE.
    pub recipient_count: &'a str,
    /// `instance`: identifies one message transaction within one smtpd.
    pub instance: &'a str,
    /// `policy_context`: set by `check_policy_service { ..., policy_context=... }`.
    pub policy_context: &'a str,
    /// `size`: message size in bytes (exact only at END-OF-MESSAGE).
    pub size: &'a str,
}

impl PolicyRequest<'_> {
    /// `recipient_count` as a number; missing, negative or non-numeric is 0
    /// (SPEC §3).
    pub fn recipient_count(&self) -> u32 {
        self.recipient_count.trim().parse::<u32>().unwrap_or(0)
    }
}

/// The attributes the daemon uses, in the order of [`PolicyRequest`]'s fields.
const USED: [&str; 13] = [
    "request",
    "protocol_state",
    "sasl_username",
    "sasl_method",
    "client_name",
    "client_address",
    "queue_id",
    "sender",
    "recipient",
    "recipient_count",
    "instance",
    "policy_context",
    "size",
];

/// Which of [`USED`] a name is, if any. Most names Postfix sends are unused;
/// comparing lengths first rules almost all of them out cheaply.
fn used_index(name: &[u8]) -> Option<usize> {
    USED.iter()
        .position(|u| u.len() == name.len() && u.as_bytes() == name)
}

/// Incremental request framer. Keep one per connection.
///
/// Call [`Parser::parse`] with the unconsumed bytes, which always start at the
/// beginning of the current request. It returns `Ok(None)` until a whole
/// request is there, then the request and the number of bytes it took; the
/// caller then passes the bytes after those.
///
/// One pass: while framing lines it notes where the values it will need lie
/// (offsets into the current request, which stay valid because the caller
/// only appends to the buffer until the request is complete).
#[derive(Debug, Clone, Default)]
pub struct Parser {
    bounds: Bounds,
    /// Bytes of the current request already scanned (all whole lines).
    scanned: usize,
    /// Attribute lines seen in the current request.
    attributes: usize,
    /// Where each of [`USED`] has its value in the current request
    /// (start, end); `None` while not seen. A repeated name overwrites.
    values: [Option<(u32, u32)>; USED.len()],
}

impl Parser {
    /// A parser enforcing `bounds`.
    pub fn new(bounds: Bounds) -> Self {
        Parser {
            bounds,
            ..Parser::default()
        }
    }

    /// True when part of a request has been scanned but not its end.
    pub fn in_request(&self) -> bool {
        self.scanned > 0
    }

    /// Frames the next request at the start of `buf`.
    ///
    /// Returns `Ok(Some((request, len)))` when the request is complete (it took
    /// `buf[..len]`), `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] when the bytes break a bound or are malformed; the
    /// parser must not be used for that connection afterwards.
    pub fn parse<'b>(
        &mut self,
        buf: &'b [u8],
    ) -> Result<Option<(PolicyRequest<'b>, usize)>, ProtocolError> {
        let b = self.bounds;
        let mut pos = self.scanned;
        loop {
            let rest = &buf[pos..];
            let Some(nl) = memchr::memchr(b'\n', rest) else {
                // The unfinished line may still end in a CR that is stripped.
                if rest.len() > b.max_line_len + 1 {
                    return Err(ProtocolError::LineTooLong {
                        limit: b.max_line_len,
                    });
                }
                if buf.len() > b.max_request_len {
                    return Err(ProtocolError::RequestTooLarge {
                        limit: b.max_request_len,
                    });
                }
                self.scanned = pos;
                return Ok(None);
            };
            let line = strip_cr(&rest[..nl]);
            let end = pos + nl + 1;
            if line.len() > b.max_line_len {
                return Err(ProtocolError::LineTooLong {
                    limit: b.max_line_len,
                });
            }
            if end > b.max_request_len {
                return Err(ProtocolError::RequestTooLarge {
                    limit: b.max_request_len,
                });
            }
            if line.is_empty() {
                let request = self.build(buf);
                self.scanned = 0;
                self.attributes = 0;
                self.values = Default::default();
                return request.map(|r| Some((r, end)));
            }
            self.attributes += 1;
            if self.attributes > b.max_attributes {
                return Err(ProtocolError::TooManyAttributes {
                    limit: b.max_attributes,
                });
            }
            let Some(eq) = memchr::memchr(b'=', line) else {
                // The Perl daemon dumped its cache for any line with
                // "printshm"; monitoring scripts still send it.
                if memchr::memmem::find(line, b"printshm").is_some() {
                    return Err(ProtocolError::Printshm);
                }
                return Err(ProtocolError::MissingEquals {
                    line: self.attributes,
                });
            };
            if let Some(i) = used_index(&line[..eq]) {
                // Offsets fit in u32: a request is at most max_request_len bytes.
                self.values[i] = Some(((pos + eq + 1) as u32, (pos + line.len()) as u32));
            }
            pos = end;
        }
    }

    /// The request from the noted value ranges; checks their UTF-8.
    fn build<'b>(&self, buf: &'b [u8]) -> Result<PolicyRequest<'b>, ProtocolError> {
        let mut v: [&'b str; USED.len()] = [""; USED.len()];
        for (i, range) in self.values.iter().enumerate() {
            if let Some((start, end)) = *range {
                v[i] = std::str::from_utf8(&buf[start as usize..end as usize])
                    .map_err(|_| ProtocolError::InvalidUtf8 { name: USED[i] })?;
            }
        }
        let [request, protocol_state, sasl_username, sasl_method, client_name, client_address, queue_id, sender, recipient, recipient_count, instance, policy_context, size] =
            v;
        Ok(PolicyRequest {
            request,
            protocol_state,
            sasl_username,
            sasl_method,
            client_name,
            client_address,
            queue_id,
            sender,
            recipient,
            recipient_count,
            instance,
            policy_context,
            size,
        })
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    match line.split_last() {
        Some((b'\r', head)) => head,
        _ => line,
    }
}

/// Appends the reply `action=<action>\n\n` to `out`.
///
/// `action` must be one line; the daemon only passes actions validated by
/// the configuration or rendered from numbers and dates.
pub fn encode_action(action: &str, out: &mut Vec<u8>) {
    debug_assert!(!action.contains('\n'), "actions are single lines");
    out.reserve(action.len() + 9);
    out.extend_from_slice(b"action=");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// Writes a value into a log line as data: control characters of every
/// kind (C0, DEL, C1 such as NEL and CSI), the Unicode line and paragraph
/// separators, the bidirectional controls that reorder what a terminal
/// shows, and backslashes are escaped, so a client can neither forge a line
/// nor confuse a parser or a reader of the log (SPEC §8).
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// Whether `c` is written escaped.
fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL, C1
        || matches!(c, '\\' | '\u{2028}' | '\u{2029}')
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        // Fast path: ASCII without control characters or backslashes (every
        // character needing an escape is either below 0x20, 0x7f, '\\', or
        // not ASCII).
        if s.bytes().all(|c| (0x20..0x7f).contains(&c) && c != b'\\') {
            return f.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(f, "\\x{:02x}", c as u32)?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> Result<Option<(PolicyRequest<'_>, usize)>, ProtocolError> {
        Parser::default().parse(input)
    }

    #[test]
    fn parses_a_request_and_reports_its_length() {
        let input = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsasl_username=Alice@Example.com\n\nrest";
        let (req, len) = parse_all(input).unwrap().unwrap();
        assert_eq!(req.request, "smtpd_access_policy");
        assert_eq!(req.protocol_state, "RCPT");
        assert_eq!(req.sasl_username, "Alice@Example.com");
        assert_eq!(&input[len..], b"rest");
    }

    #[test]
    fn crlf_is_accepted_and_cr_stripped() {
        let input = b"request=smtpd_access_policy\r\nsasl_username=bob\r\n\r\n";
        let (req, len) = parse_all(input).unwrap().unwrap();
        assert_eq!(req.sasl_username, "bob");
        assert_eq!(len, input.len());
    }

    #[test]
    fn splits_at_first_equals() {
        let (req, _) = parse_all(b"sasl_username=a=b==c\n\n").unwrap().unwrap();
        assert_eq!(req.sasl_username, "a=b==c");
    }

    #[test]
    fn last_repeated_attribute_wins_and_unknown_are_ignored() {
        let (req, _) = parse_all(b"sasl_username=a\nfoo=bar\nsasl_username=b\n\n")
            .unwrap()
            .unwrap();
        assert_eq!(req.sasl_username, "b");
    }

    #[test]
    fn incremental_parse_resumes() {
        let full = b"request=smtpd_access_policy\nsasl_username=x\n\n";
        let mut p = Parser::default();
        for cut in 1..full.len() {
            assert_eq!(p.parse(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (req, len) = p.parse(full).unwrap().unwrap();
        assert_eq!((req.sasl_username, len), ("x", full.len()));
        assert!(!p.in_request());
    }

    #[test]
    fn line_bound_is_exact() {
        let b = Bounds::default();
        let ok = format!("x={}\n\n", "a".repeat(b.max_line_len - 2));
        assert!(parse_all(ok.as_bytes()).unwrap().is_some());
        let long = format!("x={}\n\n", "a".repeat(b.max_line_len - 1));
        assert_eq!(
            parse_all(long.as_bytes()),
            Err(ProtocolError::LineTooLong {
                limit: b.max_line_len
            })
        );
        // Detected before the line ends.
        let unfinished = format!("x={}", "a".repeat(b.max_line_len + 10));
        assert!(matches!(
            parse_all(unfinished.as_bytes()),
            Err(ProtocolError::LineTooLong { .. })
        ));
    }

    #[test]
    fn attribute_bound_is_exact() {
        let ok: String = (0..256).map(|i| format!("a{i}=1\n")).collect::<String>() + "\n";
        assert!(parse_all(ok.as_bytes()).unwrap().is_some());
        let over: String = (0..257).map(|i| format!("a{i}=1\n")).collect::<String>() + "\n";
        assert_eq!(
            parse_all(over.as_bytes()),
            Err(ProtocolError::TooManyAttributes { limit: 256 })
        );
    }

    #[test]
    fn request_bound() {
        let bounds = Bounds {
            max_line_len: 100,
            max_request_len: 50,
            max_attributes: 256,
        };
        let mut p = Parser::new(bounds);
        let twenty = b"a=123456789012345678\n"; // 21 bytes
        let mut buf = Vec::new();
        buf.extend_from_slice(twenty);
        buf.extend_from_slice(twenty);
        assert_eq!(p.parse(&buf).unwrap(), None);
        buf.extend_from_slice(twenty);
        assert_eq!(
            p.parse(&buf),
            Err(ProtocolError::RequestTooLarge { limit: 50 })
        );
    }

    #[test]
    fn invalid_utf8_only_matters_in_used_values() {
        assert!(parse_all(b"ccert_subject=\xff\xfe\n\n").unwrap().is_some());
        assert_eq!(
            parse_all(b"sasl_username=\xff\n\n"),
            Err(ProtocolError::InvalidUtf8 {
                name: "sasl_username"
            })
        );
    }

    #[test]
    fn printshm_gets_its_own_answer() {
        assert_eq!(parse_all(b"printshm\n"), Err(ProtocolError::Printshm));
        assert_eq!(parse_all(b"printshm\r\n"), Err(ProtocolError::Printshm));
        assert!(ProtocolError::Printshm
            .to_string()
            .contains("ratelimit-policyd status"));
    }

    #[test]
    fn line_without_equals_is_an_error() {
        assert_eq!(
            parse_all(b"request=x\ngarbage\n\n"),
            Err(ProtocolError::MissingEquals { line: 2 })
        );
    }

    #[test]
    fn every_used_name_is_recognised_and_others_are_not() {
        for name in USED {
            assert!(used_index(name.as_bytes()).is_some(), "{name}");
        }
        for name in [
            "protocol_name",
            "client_port",
            "helo_name",
            "sasl_sender",
            "ccert_subject",
            "stress",
            "x",
            "",
        ] {
            assert_eq!(used_index(name.as_bytes()), None, "{name}");
        }
    }

    #[test]
    fn recipient_count_is_lenient() {
        for (raw, n) in [("3", 3), ("", 0), ("-2", 0), ("abc", 0), (" 7 ", 7)] {
            let req = PolicyRequest {
                recipient_count: raw,
                ..Default::default()
            };
            assert_eq!(req.recipient_count(), n, "{raw:?}");
        }
    }

    #[test]
    fn encodes_action() {
        let mut out = Vec::new();
        encode_action("DUNNO", &mut out);
        assert_eq!(out, b"action=DUNNO\n\n");
    }

    #[test]
    fn escaped_neutralises_control_characters() {
        assert_eq!(Escaped("plain%s%n").to_string(), "plain%s%n");
        assert_eq!(
            Escaped("a\nfake: line\r\\\u{7}").to_string(),
            "a\\nfake: line\\r\\\\\\x07"
        );
        // C1 (NEL, CSI), DEL, line and paragraph separators, and the bidi
        // controls that reorder what a terminal shows: all escaped.
        assert_eq!(
            Escaped("a\u{85}NOQUEUE: b\u{9b}31m\u{7f}c\u{2028}d\u{2029}e\u{202e}f\u{2066}")
                .to_string(),
            "a\\u{85}NOQUEUE: b\\u{9b}31m\\x7fc\\u{2028}d\\u{2029}e\\u{202e}f\\u{2066}"
        );
        assert_eq!(Escaped("Zürich ✓ 日本").to_string(), "Zürich ✓ 日本");
    }
}
