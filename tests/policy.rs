//! SPEC §3–§5 over a real socket: what is charged, how much, and the answers.

mod common;

use common::{is_deferred, is_dunno, start, Req};

const ALICE: &str = "alice@example.com";

#[tokio::test]
async fn exactly_quota_is_accepted_and_the_refusal_says_why() {
    let s = start("[limits]\ndefault_quota = 3\ntimezone = \"Europe/Zurich\"\n").await;
    let mut c = s.client().await;
    for r in ["a@x", "b@x", "c@x"] {
        assert_eq!(
            c.ask(&Req::rcpt(ALICE, "i1", r)).await,
            "DUNNO",
            "recipient {r}"
        );
    }
    let refused = c.ask(&Req::rcpt(ALICE, "i1", "d@x")).await;
    // T0 is 2026-09-21 16:13 in Zurich; the daily window ends at midnight.
    assert_eq!(
        refused,
        "DEFER_IF_PERMIT 4.7.1 daily sender quota exceeded (4/3), resets 2026-09-22 00:00 CEST"
    );
    // Refused requests keep being counted (count_rejected = true).
    assert!(is_deferred(&c.ask(&Req::rcpt(ALICE, "i2", "e@x")).await));
    assert_eq!(s.used(ALICE), 5);
}

#[tokio::test]
async fn count_rejected_false_adds_nothing_for_refusals() {
    let s = start("[limits]\ndefault_quota = 1\ncount_rejected = false\n").await;
    let mut c = s.client().await;
    assert!(is_dunno(&c.ask(&Req::rcpt(ALICE, "i1", "a@x")).await));
    for r in ["b@x", "c@x"] {
        assert!(is_deferred(&c.ask(&Req::rcpt(ALICE, "i1", r)).await));
    }
    assert_eq!(s.used(ALICE), 1);
}

#[tokio::test]
async fn rcpt_recipients_charges_one_per_request_and_a_new_sender_is_checked() {
    let s = start("[limits]\ndefault_quota = 0\n").await;
    let mut c = s.client().await;
    // quota 0 blocks, and the very first request of a new sender is checked.
    assert!(is_deferred(&c.ask(&Req::rcpt(ALICE, "i1", "a@x")).await));
    assert_eq!(s.used(ALICE), 1);
}

#[tokio::test]
async fn duplicate_rcpt_queries_are_charged_once_and_get_the_first_answer() {
    let s = start("[limits]\ndefault_quota = 2\n").await;
    let mut c = s.client().await;
    // The same check_policy_service in smtpd_sender_restrictions and
    // smtpd_recipient_restrictions: two identical queries per recipient.
    for r in ["a@x", "b@x"] {
        assert_eq!(c.ask(&Req::rcpt(ALICE, "i1", r)).await, "DUNNO");
        assert_eq!(c.ask(&Req::rcpt(ALICE, "i1", r)).await, "DUNNO");
    }
    let first = c.ask(&Req::rcpt(ALICE, "i1", "c@x")).await;
    assert!(is_deferred(&first));
    assert_eq!(c.ask(&Req::rcpt(ALICE, "i1", "c@x")).await, first);
    assert_eq!(s.used(ALICE), 3);
    // A different policy_context is a different query: charged.
    c.ask(&Req::rcpt(ALICE, "i1", "c@x").with("policy_context", "second"))
        .await;
    assert_eq!(s.used(ALICE), 4);
    // The same recipient in a new transaction is a new recipient.
    c.ask(&Req::rcpt(ALICE, "i2", "a@x")).await;
    assert_eq!(s.used(ALICE), 5);
}

#[tokio::test]
async fn rcpt_messages_charges_the_first_rcpt_of_an_instance() {
    let s = start("[limits]\ndefault_quota = 2\ncount = \"messages\"\n").await;
    let mut c = s.client().await;
    for (instance, rcpts) in [("i1", 3), ("i2", 2)] {
        for n in 0..rcpts {
            let a = c.ask(&Req::rcpt(ALICE, instance, &format!("r{n}@x"))).await;
            assert_eq!(a, "DUNNO", "{instance} recipient {n}");
        }
    }
    assert_eq!(s.used(ALICE), 2);
    assert!(is_deferred(&c.ask(&Req::rcpt(ALICE, "i3", "a@x")).await));
    assert!(
        is_deferred(&c.ask(&Req::rcpt(ALICE, "i3", "b@x")).await),
        "rest of a refused message"
    );
    assert_eq!(s.used(ALICE), 3);
}

#[tokio::test]
async fn mail_stage_charges_one_per_request_both_modes() {
    for count in ["recipients", "messages"] {
        let s = start(&format!(
            "[limits]\ndefault_quota = 2\ncharge_stage = \"MAIL\"\ncount = \"{count}\"\n"
        ))
        .await;
        let mut c = s.client().await;
        // At MAIL with smtpd_delay_reject = no, instance and queue_id are empty.
        let mail = Req::rcpt(ALICE, "", "").state("MAIL");
        assert_eq!(c.ask(&mail).await, "DUNNO");
        assert_eq!(
            c.ask(&mail).await,
            "DUNNO",
            "empty instance: not a duplicate"
        );
        assert!(is_deferred(&c.ask(&mail).await), "{count}");
        assert_eq!(s.used(ALICE), 3, "{count}");
    }
}

#[tokio::test]
async fn data_and_end_of_message_charge_recipient_count_or_one_message() {
    for stage in ["DATA", "END-OF-MESSAGE"] {
        let s = start(&format!(
            "[limits]\ndefault_quota = 5\ncharge_stage = \"{stage}\"\n"
        ))
        .await;
        let mut c = s.client().await;
        let msg = |instance: &str, n: &str| {
            Req::rcpt(ALICE, instance, "")
                .state(stage)
                .with("recipient_count", n)
        };
        assert_eq!(c.ask(&msg("i1", "3")).await, "DUNNO");
        assert_eq!(s.used(ALICE), 3, "{stage}: recipient_count");
        // The same transaction again, 2 recipients more: only the increase.
        assert_eq!(c.ask(&msg("i1", "5")).await, "DUNNO");
        assert_eq!(s.used(ALICE), 5, "{stage}: increase only");
        // recipient_count 0, missing, negative or junk counts as 1.
        assert!(is_deferred(&c.ask(&msg("i2", "0")).await));
        c.ask(&msg("i3", "-4")).await;
        c.ask(&msg("i4", "lots")).await;
        assert_eq!(s.used(ALICE), 8, "{stage}: bad counts are 1");

        let s = start(&format!(
            "[limits]\ndefault_quota = 1\ncharge_stage = \"{stage}\"\ncount = \"messages\"\n"
        ))
        .await;
        let mut c = s.client().await;
        assert_eq!(c.ask(&msg("i1", "40")).await, "DUNNO");
        assert_eq!(
            c.ask(&msg("i1", "41")).await,
            "DUNNO",
            "{stage}: same message again"
        );
        assert!(is_deferred(&c.ask(&msg("i2", "1")).await));
        assert_eq!(s.used(ALICE), 2, "{stage}: messages");
    }
}

#[tokio::test]
async fn other_stages_are_answered_not_charged() {
    let s = start("[limits]\ndefault_quota = 1\n").await;
    let mut c = s.client().await;
    for state in ["CONNECT", "EHLO", "HELO", "VRFY", "ETRN", "junk"] {
        assert_eq!(
            c.ask(&Req::rcpt(ALICE, "i1", "a@x").state(state)).await,
            "DUNNO",
            "{state}"
        );
    }
    // Stages of the table other than charge_stage: checked, not charged.
    let data = Req::rcpt(ALICE, "i1", "")
        .state("DATA")
        .with("recipient_count", "7");
    assert_eq!(c.ask(&data).await, "DUNNO");
    assert_eq!(s.used(ALICE), 0);
    c.ask(&Req::rcpt(ALICE, "i1", "a@x")).await;
    assert_eq!(c.ask(&data).await, "DUNNO", "at quota is not over quota");
    c.ask(&Req::rcpt(ALICE, "i1", "b@x")).await;
    assert!(
        is_deferred(&c.ask(&data).await),
        "over quota is refused at any stage"
    );
    assert!(is_deferred(
        &c.ask(&data.clone().state("END-OF-MESSAGE")).await
    ));
    assert_eq!(s.used(ALICE), 2);
    // A request that is not smtpd_access_policy is not a policy question.
    assert_eq!(
        c.ask(&Req::rcpt(ALICE, "i9", "z@x").with("request", "junk"))
            .await,
        "DUNNO"
    );
    assert_eq!(s.used(ALICE), 2);
}

#[tokio::test]
async fn unauthenticated_requests_are_not_charged() {
    let s = start("[limits]\ndefault_quota = 0\n").await;
    let mut c = s.client().await;
    for user in ["", "   "] {
        assert_eq!(c.ask(&Req::rcpt(user, "i1", "a@x")).await, "DUNNO");
    }
    assert!(s.daemon().store.is_empty());

    let s = start("[limits]\nunauthenticated_action = \"REJECT authentication required\"\n").await;
    let mut c = s.client().await;
    assert_eq!(
        c.ask(&Req::rcpt("", "i1", "a@x")).await,
        "REJECT authentication required"
    );
    assert!(s.daemon().store.is_empty());
}

#[tokio::test]
async fn keys_by_email_are_lower_cased_and_trimmed() {
    let s = start("[limits]\ndefault_quota = 2\n").await;
    let mut c = s.client().await;
    c.ask(&Req::rcpt("Alice@Example.COM", "i1", "a@x")).await;
    c.ask(&Req::rcpt(" alice@example.com ", "i1", "b@x")).await;
    assert!(is_deferred(
        &c.ask(&Req::rcpt("ALICE@EXAMPLE.COM", "i1", "c@x")).await
    ));
    assert_eq!(s.used(ALICE), 3);
    // Another user of the same domain has a counter of their own.
    assert_eq!(
        c.ask(&Req::rcpt("bob@example.com", "i1", "c@x")).await,
        "DUNNO"
    );
}

#[tokio::test]
async fn keys_by_domain_share_one_counter() {
    let s = start("[limits]\ndefault_quota = 2\nkey_type = \"domain\"\n").await;
    let mut c = s.client().await;
    c.ask(&Req::rcpt("alice@Example.com", "i1", "a@x")).await;
    c.ask(&Req::rcpt("bob@example.com", "i2", "a@x")).await;
    assert!(is_deferred(
        &c.ask(&Req::rcpt("carol@EXAMPLE.COM", "i3", "a@x")).await
    ));
    assert_eq!(s.used("example.com"), 3);
    // A login without '@' is its own key.
    assert_eq!(c.ask(&Req::rcpt("localuser", "i4", "a@x")).await, "DUNNO");
    assert_eq!(s.used("localuser"), 1);
}

#[tokio::test]
async fn exempt_senders_are_never_charged() {
    let s = start("[limits]\ndefault_quota = 0\nexempt = [\"Newsletter@Example.com\"]\n").await;
    let mut c = s.client().await;
    for n in 0..5 {
        assert_eq!(
            c.ask(&Req::rcpt(
                "newsletter@example.com",
                "i1",
                &format!("{n}@x")
            ))
            .await,
            "DUNNO"
        );
    }
    assert!(s.daemon().store.get("newsletter@example.com").is_none());
    assert!(is_deferred(&c.ask(&Req::rcpt(ALICE, "i1", "a@x")).await));
}

#[tokio::test]
async fn over_quota_action_is_a_template() {
    let s = start(
        "[limits]\ndefault_quota = 1\nperiod = \"hourly\"\ntimezone = \"UTC\"\n\
         over_quota_action = \"REJECT 5.7.1 {period} limit {quota}, used {used}, until {reset}\"\n",
    )
    .await;
    let mut c = s.client().await;
    c.ask(&Req::rcpt(ALICE, "i1", "a@x")).await;
    assert_eq!(
        c.ask(&Req::rcpt(ALICE, "i1", "b@x")).await,
        "REJECT 5.7.1 hourly limit 1, used 2, until 2026-09-21 15:00 UTC"
    );
}

#[tokio::test]
async fn hostile_values_stay_data() {
    // '%', quotes, newlines-as-escapes and SQL in a username are just a key.
    let s = start("[limits]\ndefault_quota = 1\n").await;
    let mut c = s.client().await;
    let evil = "x'; DROP TABLE ratelimit; --%s%n\"@example.com";
    assert_eq!(c.ask(&Req::rcpt(evil, "i1", "a@x")).await, "DUNNO");
    assert!(is_deferred(&c.ask(&Req::rcpt(evil, "i1", "b@x")).await));
    assert_eq!(s.used(&evil.to_lowercase()), 2);
}
