//! The cache codec on the project's real message type: rmp-serde
//! (MessagePack, what the cache stores) against serde_json, encode and
//! decode, with the bytes per message printed once.
//!
//! Run: `cargo bench -p shared --bench codec`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use shared::cache::CachedMessage;
use shared::codec::{decode, encode, Encoding};
use shared::protocol::Message;
use uuid::Uuid;

fn message(body_bytes: usize) -> Message {
    Message {
        id: Uuid::now_v7(),
        chat: Uuid::now_v7(),
        seq: 123_456,
        from: Uuid::now_v7(),
        to: Some(Uuid::now_v7()),
        body: "x".repeat(body_bytes),
        ts: 1_795_622_167_351,
    }
}

fn codec(c: &mut Criterion) {
    let m = message(100);
    let entry = CachedMessage::of(&m);
    let mp = entry.encode();
    let json = encode(&entry, Encoding::Json).unwrap();
    eprintln!(
        "bytes per message (100-byte body): msgpack {} json {}",
        mp.len(),
        json.len()
    );

    let mut group = c.benchmark_group("cache_entry");
    group.bench_function("msgpack_encode", |b| b.iter(|| black_box(&entry).encode()));
    group.bench_function("json_encode", |b| {
        b.iter(|| encode(black_box(&entry), Encoding::Json).unwrap())
    });
    group.bench_function("msgpack_decode", |b| {
        b.iter(|| CachedMessage::decode(black_box(&mp), 123_456).unwrap())
    });
    group.bench_function("json_decode", |b| {
        b.iter(|| decode::<CachedMessage>(black_box(&json), Encoding::Json).unwrap())
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
