//! Unit tests of the worker's pure parts: entries to jobs or failures, the
//! retry decision, and the lag figure.

use super::*;
use shared::protocol::Message;
use uuid::Uuid;

fn entry(id: &str, fields: &[(&str, &str)]) -> Entry {
    Entry {
        id: id.into(),
        fields: Some(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        ),
    }
}

#[test]
fn a_valid_entry_parses_to_its_job() {
    let job = Job::Message(Message {
        id: Uuid::now_v7(),
        chat: Uuid::now_v7(),
        seq: 1,
        from: Uuid::now_v7(),
        to: Some(Uuid::now_v7()),
        body: "hi".into(),
        ts: 1,
    });
    let fields: Vec<(&str, String)> = job.to_fields();
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(parse(entry("1-0", &pairs)), Ok(("1-0".to_string(), job)));
}

#[test]
fn a_malformed_entry_fails_with_its_class_and_is_never_retried() {
    let failed = parse(entry(
        "2-0",
        &[("v", "1"), ("kind", "message"), ("to", ""), ("id", "x")],
    ))
    .unwrap_err();
    assert_eq!(failed.id, "2-0");
    assert_eq!(failed.class, "invalid");
    assert!(failed.reason.contains("`id`"), "{}", failed.reason);
    assert!(!failed.retryable);

    let failed = parse(entry("3-0", &[("v", "2")])).unwrap_err();
    assert_eq!(failed.class, "version");
    let failed = parse(entry("4-0", &[("v", "1"), ("kind", "poll")])).unwrap_err();
    assert_eq!(failed.class, "kind");
    let failed = parse(entry("5-0", &[])).unwrap_err();
    assert_eq!(failed.class, "missing");
    let failed = parse(Entry {
        id: "6-0".into(),
        fields: None,
    })
    .unwrap_err();
    assert_eq!(failed.class, "deleted");
}

#[test]
fn refused_jobs_are_retried_up_to_the_limit_and_non_jobs_never() {
    let policy = RetryPolicy {
        max_deliveries: 3,
        first_delay: Duration::from_millis(10),
        max_delay: Duration::from_secs(1),
    };
    assert_eq!(decide(&policy, true, 1), Verdict::Retry(Duration::from_millis(10)));
    assert_eq!(decide(&policy, true, 2), Verdict::Retry(Duration::from_millis(20)));
    assert_eq!(decide(&policy, true, 3), Verdict::DeadLetter);
    assert_eq!(decide(&policy, false, 1), Verdict::DeadLetter);
}

#[test]
fn a_refused_entry_becomes_a_dead_letter_with_reason_source_and_deliveries() {
    let failed = Failed {
        id: "1700000000000-7".into(),
        class: "refused",
        reason: "PostgreSQL: db error: ERROR: value too long".into(),
        retryable: true,
    };
    let letter = failed.into_letter(5);
    assert_eq!(letter.source_id, "1700000000000-7");
    assert_eq!(letter.class, "refused");
    assert_eq!(letter.deliveries, Some(5));
    let meta: Vec<(String, String)> = letter
        .meta_fields()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
        .collect();
    assert_eq!(
        meta,
        [
            (
                "reason".to_string(),
                "PostgreSQL: db error: ERROR: value too long".to_string()
            ),
            ("class".to_string(), "refused".to_string()),
            ("source_id".to_string(), "1700000000000-7".to_string()),
            ("deliveries".to_string(), "5".to_string()),
        ]
    );
}

#[test]
fn the_oldest_age_comes_from_the_first_entry_id_and_the_redis_clock() {
    assert_eq!(oldest_age(10_000, None), Duration::ZERO);
    assert_eq!(oldest_age(10_000, Some("7500-3")), Duration::from_millis(2_500));
    // An id from the future (the clock stepped back) is not a negative age.
    assert_eq!(oldest_age(10_000, Some("12000-0")), Duration::ZERO);
    assert_eq!(oldest_age(10_000, Some("garbage")), Duration::ZERO);
}

#[test]
fn logged_reasons_leave_out_the_failing_row() {
    let reason = "PostgreSQL: db error: ERROR: new row violates check constraint \"c\" DETAIL: Failing row contains (1, secret body).";
    assert_eq!(
        without_row(reason),
        "PostgreSQL: db error: ERROR: new row violates check constraint \"c\""
    );
    let other = "PostgreSQL: db error: ERROR: duplicate key DETAIL: Key (chat, seq)=(x, 4) already exists.";
    assert_eq!(without_row(other), other);
}

fn owned(fields: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// The fast path returns what the reference parser returns, or nothing.
fn agrees(fields: &[(&str, &str)]) -> Option<Job> {
    let reference = Job::from_fields(&owned(fields).into_iter().collect()).ok();
    let fast = message_fast(&mut owned(fields));
    if let Some(job) = &fast {
        assert_eq!(Some(job), reference.as_ref(), "{fields:?}");
    }
    assert_eq!(
        parse(entry("1-0", fields)).ok().map(|(_, j)| j),
        reference,
        "{fields:?}"
    );
    fast
}

#[test]
fn the_message_fast_path_agrees_with_the_reference_parser() {
    let id = "0190a0b0-0000-7000-8000-000000000001";
    let chat = "0190a0b0-0000-7000-8000-0000000000c1";
    let user = "0190a0b0-0000-7000-8000-0000000000a1";
    let base = [
        ("v", "1"),
        ("kind", "message"),
        ("id", id),
        ("chat", chat),
        ("seq", "42"),
        ("from", user),
        ("to", ""),
        ("body", "héllo"),
        ("ts", "1700000000000"),
    ];
    let job = agrees(&base).expect("the gateway's field order takes the fast path");
    let Job::Message(m) = job else { panic!("not a message") };
    assert_eq!((m.seq, m.to, m.body.as_str()), (42, None, "héllo"));

    // Any order, extra fields, a recipient: still fast.
    let mut shuffled = base.to_vec();
    shuffled.reverse();
    shuffled.push(("extra", "x"));
    shuffled[2] = ("to", user);
    assert!(agrees(&shuffled).is_some());

    // Everything else falls back to the reference parser, which decides.
    let with = |field: &str, value: &'static str| {
        let mut f = base.to_vec();
        f.iter_mut().find(|(k, _)| *k == field).unwrap().1 = value;
        f
    };
    for (field, value) in [
        ("v", "2"),
        ("kind", "chat"),
        ("id", "not-a-uuid"),
        ("seq", "4.5"),
        ("to", "nobody"),
        ("ts", ""),
        ("chat", "0190a0b000007000800000000000000c1"),
    ] {
        assert!(agrees(&with(field, value)).is_none(), "{field}={value}");
    }
    let mut repeated = base.to_vec();
    repeated.push(("seq", "43"));
    assert!(agrees(&repeated).is_none());
    let missing: Vec<_> = base.iter().copied().filter(|(k, _)| *k != "ts").collect();
    assert!(agrees(&missing).is_none());

    // A body that is not UTF-8.
    let mut bad = owned(&base);
    bad[7].1 = vec![0xff, 0xfe];
    assert!(message_fast(&mut bad).is_none());
}
