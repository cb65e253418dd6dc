//! The decision: which requests are charged, how much, and what to answer.
//!
//! Pure code (SPEC §3–§5): [`evaluate`] reads one [`PolicyRequest`], asks the
//! [`CounterStore`] and returns a [`Decision`]. It never awaits, logs or
//! touches a socket; the caller logs and counts.
//!
//! What is charged, in short:
//! - only `request=smtpd_access_policy` at RCPT, MAIL, DATA or END-OF-MESSAGE;
//!   anything else is answered `DUNNO` and not charged;
//! - only at `charge_stage`; requests at the other stages are refused when the
//!   sender is already over quota, but add nothing, so a daemon wired into
//!   several restriction lists never double-counts;
//! - per connection, the last charged request is remembered
//!   ([`ConnectionMemory`]): an identical repeat at RCPT (same `instance`,
//!   `sasl_username`, `recipient`, `protocol_state`, `policy_context`) — Postfix sends one when
//!   the same `check_policy_service` is in two restriction lists — gets the
//!   first answer and is not charged again; at DATA/END-OF-MESSAGE only the
//!   increase of `recipient_count` within an `instance` is charged.
//!
//! Fail-open by design: this module has no error path. Whatever a request
//! holds, it gets an answer, and malformed numbers count as 0.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use crate::protocol::PolicyRequest;
use crate::store::{CounterStore, Limit, Outcome, Period, MAX_KEY_BYTES};

/// What identifies a sender (SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// The whole `sasl_username`.
    Email,
    /// The part of `sasl_username` after the last `@`.
    Domain,
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountMode {
    /// Each recipient is one unit.
    Recipients,
    /// Each message is one unit.
    Messages,
}

/// The SMTP stages a policy request can come from (`protocol_state`) that the
/// daemon knows how to charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// `MAIL` (sender restrictions with `smtpd_delay_reject = no`).
    Mail,
    /// `RCPT` (sender or recipient restrictions): one request per recipient.
    Rcpt,
    /// `DATA` (`smtpd_data_restrictions`).
    Data,
    /// `END-OF-MESSAGE` (`smtpd_end_of_data_restrictions`).
    EndOfMessage,
}

impl Stage {
    /// Reads a `protocol_state` value (case-insensitive); `None` for stages
    /// that are never charged (CONNECT, HELO, VRFY, ETRN, ...).
    pub fn parse(s: &str) -> Option<Stage> {
        if s.eq_ignore_ascii_case("RCPT") {
            Some(Stage::Rcpt)
        } else if s.eq_ignore_ascii_case("MAIL") {
            Some(Stage::Mail)
        } else if s.eq_ignore_ascii_case("DATA") {
            Some(Stage::Data)
        } else if s.eq_ignore_ascii_case("END-OF-MESSAGE") {
            Some(Stage::EndOfMessage)
        } else {
            None
        }
    }

    /// Where `check_policy_service` must be for requests of this stage.
    pub fn restriction_list(self) -> &'static str {
        match self {
            Stage::Mail => "smtpd_sender_restrictions with smtpd_delay_reject = no",
            Stage::Rcpt => "smtpd_sender_restrictions or smtpd_recipient_restrictions",
            Stage::Data => "smtpd_data_restrictions",
            Stage::EndOfMessage => "smtpd_end_of_data_restrictions",
        }
    }

    /// The `protocol_state` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfMessage => "END-OF-MESSAGE",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `over_quota_action`, parsed once: text with `{period}`, `{used}`,
/// `{quota}` and `{reset}` placeholders (`{{` and `}}` are literal braces).
/// No placeholder takes request data, so a client cannot inject into a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionTemplate {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Period,
    Used,
    Quota,
    Reset,
}

impl ActionTemplate {
    /// Parses a template.
    ///
    /// # Errors
    ///
    /// An unknown or unclosed placeholder, or a line break.
    pub fn parse(source: &str) -> Result<ActionTemplate, String> {
        validate_action(source)?;
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = source;
        while let Some(i) = rest.find(['{', '}']) {
            text.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(after) = tail.strip_prefix("{{") {
                text.push('{');
                rest = after;
                continue;
            }
            if let Some(after) = tail.strip_prefix("}}") {
                text.push('}');
                rest = after;
                continue;
            }
            if tail.starts_with('}') {
                return Err("unmatched '}' (write '}}' for a literal brace)".into());
            }
            let close = tail
                .find('}')
                .ok_or("unclosed '{' (write '{{' for a literal brace)")?;
            let part = match &tail[1..close] {
                "period" => Part::Period,
                "used" => Part::Used,
                "quota" => Part::Quota,
                "reset" => Part::Reset,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}} (known: {{period}}, {{used}}, {{quota}}, {{reset}})"
                    ))
                }
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(part);
            rest = &tail[close + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(ActionTemplate {
            source: source.to_owned(),
            parts,
        })
    }

    /// The template as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Fills the placeholders. `reset` is called only when the template uses it.
    pub fn render(
        &self,
        period: &Period,
        used: u32,
        quota: u32,
        reset: impl FnOnce() -> String,
    ) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(self.source.len() + 32);
        let mut reset = Some(reset);
        for part in &self.parts {
            // Writing to a String cannot fail.
            let _ = match part {
                Part::Text(t) => out.write_str(t),
                Part::Period => write!(out, "{period}"),
                Part::Used => write!(out, "{used}"),
                Part::Quota => write!(out, "{quota}"),
                Part::Reset => out.write_str(&reset.take().map(|f| f()).unwrap_or_default()),
            };
        }
        out
    }
}

/// Checks that an action can be sent as one `action=` line.
///
/// # Errors
///
/// An empty action, or one with a control character (a line break would end
/// the reply early and desynchronise Postfix).
pub fn validate_action(action: &str) -> Result<(), String> {
    if action.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if action.chars().any(|c| c.is_control()) {
        return Err("must be one line without control characters".into());
    }
    Ok(())
}

/// The validated policy settings (the `[limits]` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// What identifies a sender.
    pub key_type: KeyType,
    /// What is counted.
    pub count: CountMode,
    /// The one stage at which requests are charged.
    pub charge_stage: Stage,
    /// Window and quota rules.
    pub limit: Limit,
    /// Reply for a sender over quota.
    pub over_quota_action: ActionTemplate,
    /// Reply for a request without `sasl_username`.
    pub unauthenticated_action: String,
    /// Reply for a login longer than [`MAX_KEY_BYTES`] (no counter is made).
    pub key_too_long_action: String,
    /// Reply for a sender without a counter while the store holds
    /// `max_counters` (no counter is made).
    pub counters_full_action: String,
    /// Keys (lower-case) that are never charged.
    pub exempt: HashSet<Box<str>>,
}

/// What the daemon answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `DUNNO`: no opinion, Postfix goes on with its restrictions.
    Dunno,
    /// The configured `unauthenticated_action`.
    Unauthenticated,
    /// A rendered `over_quota_action`.
    OverQuota(String),
    /// The configured `key_too_long_action`.
    KeyTooLong,
    /// The configured `counters_full_action`.
    CountersFull,
}

impl Action {
    /// The text after `action=`.
    pub fn as_str<'p>(&'p self, policy: &'p Policy) -> &'p str {
        match self {
            Action::Dunno => "DUNNO",
            Action::Unauthenticated => &policy.unauthenticated_action,
            Action::OverQuota(s) => s,
            Action::KeyTooLong => &policy.key_too_long_action,
            Action::CountersFull => &policy.counters_full_action,
        }
    }
}

/// Why the answer is what it is; the stats count these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    /// Within quota (or not charged at this stage and not over quota).
    Accepted,
    /// Over quota: refused.
    OverQuota,
    /// No `sasl_username`.
    Unauthenticated,
    /// The key is in `exempt`.
    Exempt,
    /// Not a request the daemon limits (other `request` or `protocol_state`).
    Ignored,
    /// A repeat of the previous charged request on this connection.
    Duplicate,
    /// The login is longer than [`MAX_KEY_BYTES`]: no counter.
    KeyTooLong,
    /// No counter for the sender, and the store is at `max_counters`.
    CountersFull,
}

impl DecisionKind {
    /// Every kind, in a fixed order (for stats).
    pub const ALL: [DecisionKind; 8] = [
        DecisionKind::Accepted,
        DecisionKind::OverQuota,
        DecisionKind::Unauthenticated,
        DecisionKind::Exempt,
        DecisionKind::Ignored,
        DecisionKind::Duplicate,
        DecisionKind::KeyTooLong,
        DecisionKind::CountersFull,
    ];

    /// A short lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Accepted => "accepted",
            DecisionKind::OverQuota => "over_quota",
            DecisionKind::Unauthenticated => "unauthenticated",
            DecisionKind::Exempt => "exempt",
            DecisionKind::Ignored => "ignored",
            DecisionKind::Duplicate => "duplicate",
            DecisionKind::KeyTooLong => "key_too_long",
            DecisionKind::CountersFull => "counters_full",
        }
    }

    /// Index into [`DecisionKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The store's view of a request that reached the counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charged<'r> {
    /// The key that was looked up (borrowed unless it had to be lower-cased).
    pub key: Cow<'r, str>,
    /// Units asked for (0 = only checked).
    pub amount: u32,
    /// The store's answer.
    pub outcome: Outcome,
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'r> {
    /// The answer.
    pub action: Action,
    /// Why.
    pub kind: DecisionKind,
    /// Set when the request was charged or checked at the charge stage.
    pub charged: Option<Charged<'r>>,
    /// True for a limited request at a stage other than `charge_stage`: a
    /// sign of a wiring the administrator may not intend.
    pub wrong_stage: bool,
}

/// What a connection remembers between requests. Postfix sends the requests
/// of one smtpd process over one connection, in order, so the last charged
/// request is all that is needed to spot repeats: memory stays constant per
/// connection however much traffic passes. The buffers are reused, so steady
/// traffic allocates nothing here.
#[derive(Debug, Default)]
pub struct ConnectionMemory {
    /// `instance`, `sasl_username`, `recipient`, `protocol_state`,
    /// `policy_context` of the last charged RCPT request, NUL-separated.
    /// (Postfix never changes the user within an instance; comparing it costs
    /// nothing and rules out charging one user's query to another.)
    last_request: String,
    /// The answer given to it.
    last_action: Option<Action>,
    /// The `instance` the next two fields are about.
    instance: String,
    /// Recipients of `instance` already charged (DATA/END-OF-MESSAGE).
    recipients_charged: u32,
    /// Whether the message of `instance` has been counted.
    message_charged: bool,
}

impl ConnectionMemory {
    fn is_repeat(&self, req: &PolicyRequest<'_>) -> bool {
        if req.instance.is_empty() || self.last_action.is_none() {
            return false;
        }
        let mut stored = self.last_request.split('\0');
        signature(req).into_iter().all(|f| stored.next() == Some(f)) && stored.next().is_none()
    }

    fn remember(&mut self, req: &PolicyRequest<'_>, action: &Action) {
        if req.instance.is_empty() {
            self.last_action = None;
            return;
        }
        self.last_request.clear();
        for (i, f) in signature(req).into_iter().enumerate() {
            if i > 0 {
                self.last_request.push('\0');
            }
            self.last_request.push_str(f);
        }
        self.last_action = Some(action.clone());
    }

    /// Switches to `instance`, forgetting what was charged for another one.
    fn enter_instance(&mut self, instance: &str) {
        if self.instance != instance {
            self.instance.clear();
            self.instance.push_str(instance);
            self.recipients_charged = 0;
            self.message_charged = false;
        }
    }
}

/// The fields that make two RCPT requests the same query.
fn signature<'a>(req: &PolicyRequest<'a>) -> [&'a str; 5] {
    [
        req.instance,
        req.sasl_username,
        req.recipient,
        req.protocol_state,
        req.policy_context,
    ]
}

/// The key of a `sasl_username`, or `None` when it is empty (SPEC §4):
/// trimmed, lower-cased, and for [`KeyType::Domain`] the part after the last
/// `@` (a name without one, or ending in one, is its own key).
pub fn key_of(sasl_username: &str, key_type: KeyType) -> Option<Cow<'_, str>> {
    let name = sasl_username.trim();
    let key = match key_type {
        KeyType::Email => name,
        KeyType::Domain => match name.rsplit_once('@') {
            Some((_, domain)) if !domain.is_empty() => domain,
            _ => name,
        },
    };
    if key.is_empty() {
        return None;
    }
    if key.chars().any(char::is_uppercase) {
        Some(Cow::Owned(key.to_lowercase()))
    } else {
        Some(Cow::Borrowed(key))
    }
}

/// Decides one request. See the module docs for the rules.
pub fn evaluate<'r>(
    req: &PolicyRequest<'r>,
    policy: &Policy,
    store: &CounterStore,
    now: i64,
    memory: &mut ConnectionMemory,
) -> Decision<'r> {
    let ignored = Decision {
        action: Action::Dunno,
        kind: DecisionKind::Ignored,
        charged: None,
        wrong_stage: false,
    };
    if req.request != "smtpd_access_policy" {
        return ignored;
    }
    let Some(stage) = Stage::parse(req.protocol_state) else {
        return ignored;
    };
    let Some(key) = key_of(req.sasl_username, policy.key_type) else {
        return Decision {
            action: Action::Unauthenticated,
            kind: DecisionKind::Unauthenticated,
            ..ignored
        };
    };
    if key.len() > MAX_KEY_BYTES {
        return Decision {
            action: Action::KeyTooLong,
            kind: DecisionKind::KeyTooLong,
            ..ignored
        };
    }
    if policy.exempt.contains(&*key) {
        return Decision {
            kind: DecisionKind::Exempt,
            ..ignored
        };
    }
    let limit = &policy.limit;

    if stage != policy.charge_stage {
        // Answered, never charged: refused only if already over quota.
        let outcome = store.check(&key, now, limit);
        let action = match outcome {
            Some(o) if !o.accepted => over_quota(policy, &o),
            _ => Action::Dunno,
        };
        return Decision {
            kind: kind_of(&action),
            action,
            charged: None,
            wrong_stage: true,
        };
    }

    // At DATA and END-OF-MESSAGE a repeat is charged 0 by the increase rule;
    // at RCPT it is recognised here.
    if stage == Stage::Rcpt && memory.is_repeat(req) {
        let action = memory.last_action.clone().unwrap_or(Action::Dunno);
        return Decision {
            action,
            kind: DecisionKind::Duplicate,
            charged: None,
            wrong_stage: false,
        };
    }

    let tracks_instance = !req.instance.is_empty() && stage != Stage::Mail;
    if tracks_instance {
        memory.enter_instance(req.instance);
    }
    let amount = match (stage, policy.count) {
        (Stage::Mail, _) => 1,
        (Stage::Rcpt, CountMode::Recipients) => 1,
        (_, CountMode::Messages) => u32::from(!(tracks_instance && memory.message_charged)),
        (Stage::Data | Stage::EndOfMessage, CountMode::Recipients) => {
            let total = req.recipient_count().max(1);
            if tracks_instance {
                total.saturating_sub(memory.recipients_charged)
            } else {
                total
            }
        }
    };
    let Ok(outcome) = store.check_and_increment(&key, amount, now, limit) else {
        return Decision {
            action: Action::CountersFull,
            kind: DecisionKind::CountersFull,
            ..ignored
        };
    };
    if tracks_instance && outcome.added > 0 {
        match policy.count {
            CountMode::Messages => memory.message_charged = true,
            CountMode::Recipients => memory.recipients_charged += outcome.added,
        }
    }
    let action = if outcome.accepted {
        Action::Dunno
    } else {
        over_quota(policy, &outcome)
    };
    if stage == Stage::Rcpt {
        memory.remember(req, &action);
    }
    Decision {
        kind: kind_of(&action),
        action,
        charged: Some(Charged {
            key,
            amount,
            outcome,
        }),
        wrong_stage: false,
    }
}

fn kind_of(action: &Action) -> DecisionKind {
    match action {
        Action::OverQuota(_) => DecisionKind::OverQuota,
        _ => DecisionKind::Accepted,
    }
}

fn over_quota(policy: &Policy, o: &Outcome) -> Action {
    let cal = &policy.limit.calendar;
    Action::OverQuota(
        policy
            .over_quota_action
            .render(&cal.period, o.used, o.quota, || cal.format_local(o.expiry)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Calendar, Rules};
    use chrono::Weekday;

    fn policy(count: CountMode, stage: Stage, quota: u32) -> Policy {
        Policy {
            key_type: KeyType::Email,
            count,
            charge_stage: stage,
            limit: Limit {
                calendar: Calendar {
                    period: Period::Daily,
                    tz: "Europe/Zurich".parse().unwrap(),
                    week_start: Weekday::Mon,
                },
                rules: Rules {
                    default_quota: quota,
                    count_rejected: true,
                },
            },
            over_quota_action: ActionTemplate::parse(
                "DEFER_IF_PERMIT 4.7.1 {period} sender quota exceeded ({used}/{quota}), resets {reset}",
            )
            .unwrap(),
            unauthenticated_action: "DUNNO".into(),
            key_too_long_action: "DEFER_IF_PERMIT too long".into(),
            counters_full_action: "DUNNO".into(),
            exempt: HashSet::new(),
        }
    }

    fn req<'a>(
        state: &'a str,
        instance: &'a str,
        rcpt: &'a str,
        count: &'a str,
    ) -> PolicyRequest<'a> {
        PolicyRequest {
            request: "smtpd_access_policy",
            protocol_state: state,
            sasl_username: "Alice@Example.COM",
            instance,
            recipient: rcpt,
            recipient_count: count,
            ..Default::default()
        }
    }

    const NOW: i64 = 1_790_000_000;

    #[test]
    fn logins_longer_than_the_store_holds_get_no_counter() {
        let p = policy(CountMode::Recipients, Stage::Rcpt, 10);
        let store = CounterStore::new();
        let long = format!("{}@example.com", "x".repeat(250));
        let req = PolicyRequest {
            request: "smtpd_access_policy",
            protocol_state: "RCPT",
            sasl_username: &long,
            ..PolicyRequest::default()
        };
        let d = evaluate(&req, &p, &store, 0, &mut ConnectionMemory::default());
        assert_eq!(
            (d.kind, d.action.as_str(&p)),
            (DecisionKind::KeyTooLong, "DEFER_IF_PERMIT too long")
        );
        assert!(store.is_empty());
        let fits = "y".repeat(MAX_KEY_BYTES);
        let req = PolicyRequest {
            sasl_username: &fits,
            ..req
        };
        let d = evaluate(&req, &p, &store, 0, &mut ConnectionMemory::default());
        assert_eq!(d.kind, DecisionKind::Accepted);
    }

    #[test]
    fn keys() {
        assert_eq!(
            key_of("  Alice@Example.COM ", KeyType::Email).as_deref(),
            Some("alice@example.com")
        );
        assert!(matches!(
            key_of("bob@x", KeyType::Email),
            Some(Cow::Borrowed("bob@x"))
        ));
        assert_eq!(
            key_of("a@b@Sub.Example", KeyType::Domain).as_deref(),
            Some("sub.example")
        );
        assert_eq!(
            key_of("plainuser", KeyType::Domain).as_deref(),
            Some("plainuser")
        );
        assert_eq!(key_of("user@", KeyType::Domain).as_deref(), Some("user@"));
        assert_eq!(key_of("   ", KeyType::Email), None);
        assert_eq!(
            key_of("ÄRGER@x", KeyType::Email).as_deref(),
            Some("ärger@x")
        );
    }

    #[test]
    fn template_renders_and_rejects_unknown_placeholders() {
        let t =
            ActionTemplate::parse("REJECT {{x}} {used}/{quota} {period} until {reset}").unwrap();
        assert_eq!(
            t.render(&Period::Hourly, 5, 4, || "soon".into()),
            "REJECT {x} 5/4 hourly until soon"
        );
        assert!(ActionTemplate::parse("REJECT {sasl_username}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(ActionTemplate::parse("REJECT {used").is_err());
        assert!(ActionTemplate::parse("REJECT }").is_err());
        assert!(ActionTemplate::parse("REJECT\nfoo").is_err());
        assert!(ActionTemplate::parse("").is_err());
    }

    #[test]
    fn rcpt_recipients_charges_each_and_dedupes_repeats() {
        let p = policy(CountMode::Recipients, Stage::Rcpt, 2);
        let s = CounterStore::new();
        let mut m = ConnectionMemory::default();
        let d = evaluate(&req("RCPT", "i1", "a@x", "0"), &p, &s, NOW, &mut m);
        assert_eq!(
            (d.kind, d.charged.as_ref().unwrap().outcome.used),
            (DecisionKind::Accepted, 1)
        );
        let d = evaluate(&req("RCPT", "i1", "a@x", "0"), &p, &s, NOW, &mut m);
        assert_eq!(d.kind, DecisionKind::Duplicate);
        evaluate(&req("RCPT", "i1", "b@x", "0"), &p, &s, NOW, &mut m);
        let d = evaluate(&req("RCPT", "i1", "c@x", "0"), &p, &s, NOW, &mut m);
        assert_eq!(d.kind, DecisionKind::OverQuota);
        let refused = d.action.clone();
        // The repeat of a refused request gets the same refusal, uncharged.
        let d = evaluate(&req("RCPT", "i1", "c@x", "0"), &p, &s, NOW, &mut m);
        assert_eq!((d.kind, d.action), (DecisionKind::Duplicate, refused));
        assert_eq!(s.get("alice@example.com").unwrap().used, 3);
    }

    #[test]
    fn over_quota_text_names_used_quota_and_reset() {
        let p = policy(CountMode::Recipients, Stage::Rcpt, 0);
        let s = CounterStore::new();
        let d = evaluate(
            &req("RCPT", "i", "a", "0"),
            &p,
            &s,
            NOW,
            &mut ConnectionMemory::default(),
        );
        let Action::OverQuota(text) = d.action else {
            panic!("{d:?}")
        };
        // NOW is 2026-09-21 14:13:20 UTC; the next Zurich midnight is 22:00 UTC.
        assert_eq!(
            text,
            "DEFER_IF_PERMIT 4.7.1 daily sender quota exceeded (1/0), resets 2026-09-22 00:00 CEST"
        );
    }

    #[test]
    fn messages_at_rcpt_charge_the_first_recipient_only() {
        let p = policy(CountMode::Messages, Stage::Rcpt, 1);
        let s = CounterStore::new();
        let mut m = ConnectionMemory::default();
        for r in ["a", "b", "c"] {
            assert_eq!(
                evaluate(&req("RCPT", "i1", r, "0"), &p, &s, NOW, &mut m).kind,
                DecisionKind::Accepted
            );
        }
        let d = evaluate(&req("RCPT", "i2", "a", "0"), &p, &s, NOW, &mut m);
        assert_eq!(d.kind, DecisionKind::OverQuota);
        // Further recipients of the refused message are refused, not charged.
        let d = evaluate(&req("RCPT", "i2", "b", "0"), &p, &s, NOW, &mut m);
        assert_eq!(
            (d.kind, d.charged.unwrap().amount),
            (DecisionKind::OverQuota, 0)
        );
        assert_eq!(s.get("alice@example.com").unwrap().used, 2);
    }

    #[test]
    fn data_charges_only_the_increase_within_an_instance() {
        let p = policy(CountMode::Recipients, Stage::Data, 100);
        let s = CounterStore::new();
        let mut m = ConnectionMemory::default();
        evaluate(&req("DATA", "i1", "", "2"), &p, &s, NOW, &mut m);
        // Same transaction again with more recipients: only the 3 new ones.
        evaluate(&req("DATA", "i1", "", "5"), &p, &s, NOW, &mut m);
        assert_eq!(s.get("alice@example.com").unwrap().used, 5);
        // recipient_count 0 counts as 1; a new instance starts afresh.
        evaluate(&req("DATA", "i2", "", "0"), &p, &s, NOW, &mut m);
        evaluate(&req("DATA", "i3", "", "junk"), &p, &s, NOW, &mut m);
        assert_eq!(s.get("alice@example.com").unwrap().used, 7);
    }

    #[test]
    fn other_stages_check_but_do_not_charge() {
        let p = policy(CountMode::Recipients, Stage::Rcpt, 1);
        let s = CounterStore::new();
        let mut m = ConnectionMemory::default();
        let d = evaluate(&req("DATA", "i1", "", "9"), &p, &s, NOW, &mut m);
        assert!(d.wrong_stage && d.kind == DecisionKind::Accepted && s.is_empty());
        evaluate(&req("RCPT", "i1", "a", "0"), &p, &s, NOW, &mut m);
        assert_eq!(
            evaluate(&req("DATA", "i1", "", "1"), &p, &s, NOW, &mut m).kind,
            DecisionKind::Accepted
        );
        evaluate(&req("RCPT", "i1", "b", "0"), &p, &s, NOW, &mut m);
        assert_eq!(
            evaluate(&req("DATA", "i1", "", "2"), &p, &s, NOW, &mut m).kind,
            DecisionKind::OverQuota
        );
        assert_eq!(s.get("alice@example.com").unwrap().used, 2);
    }

    #[test]
    fn ignored_unauthenticated_and_exempt() {
        let mut p = policy(CountMode::Recipients, Stage::Rcpt, 1);
        p.exempt.insert("vip@example.com".into());
        let s = CounterStore::new();
        let mut m = ConnectionMemory::default();
        let mut r = req("CONNECT", "", "", "");
        assert_eq!(
            evaluate(&r, &p, &s, NOW, &mut m).kind,
            DecisionKind::Ignored
        );
        r = req("RCPT", "i", "a", "0");
        r.request = "junk";
        assert_eq!(
            evaluate(&r, &p, &s, NOW, &mut m).kind,
            DecisionKind::Ignored
        );
        r = req("RCPT", "i", "a", "0");
        r.sasl_username = "";
        assert_eq!(
            evaluate(&r, &p, &s, NOW, &mut m).kind,
            DecisionKind::Unauthenticated
        );
        r.sasl_username = "VIP@example.com";
        for _ in 0..3 {
            assert_eq!(evaluate(&r, &p, &s, NOW, &mut m).kind, DecisionKind::Exempt);
        }
        assert!(s.is_empty());
    }
}
