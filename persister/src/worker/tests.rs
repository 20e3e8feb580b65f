//! Unit tests of the worker's pure parts: entries to jobs or dead letters.

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
fn a_malformed_entry_becomes_a_dead_letter_with_its_fields() {
    let letter = parse(entry(
        "2-0",
        &[("v", "1"), ("kind", "message"), ("to", ""), ("id", "x")],
    ))
    .unwrap_err();
    assert_eq!(letter.id, "2-0");
    assert_eq!(letter.label, "invalid");
    assert!(letter.reason.contains("`id`"), "{}", letter.reason);
    assert_eq!(letter.fields.len(), 4);

    let letter = parse(entry("3-0", &[("v", "2")])).unwrap_err();
    assert_eq!(letter.label, "version");
    let letter = parse(entry("4-0", &[("v", "1"), ("kind", "poll")])).unwrap_err();
    assert_eq!(letter.label, "kind");
    let letter = parse(entry("5-0", &[])).unwrap_err();
    assert_eq!(letter.label, "missing");
    let letter = parse(Entry {
        id: "6-0".into(),
        fields: None,
    })
    .unwrap_err();
    assert_eq!(letter.label, "deleted");
}
