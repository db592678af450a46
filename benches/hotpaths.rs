//! Micro-benchmarks of the hot paths: index build from a large TOC, chunk
//! decode + verify, and cache hits. All inputs are generated deterministically
//! in setup, so figures compare across runs. See benches/README.md.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use rand::{RngCore, SeedableRng};
use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Write as _;
use streamsnap::cache::{ChunkKey, DiskCache, MemCache};
use streamsnap::digest::Digest;
use streamsnap::fetch::decode::{decode, verify};
use streamsnap::index::estargz::index_estargz;
use streamsnap::index::toc::{self, Toc};
use streamsnap::index::{Chunk, Encoding};

const TOC_ENTRIES: usize = 100_000;
const MIB: usize = 1 << 20;

/// Writes TOC entries as JSON text, handing out increasing, distinct blob
/// offsets so every chunk's compressed extent ends where the next begins.
struct TocGen {
    json: String,
    entries: usize,
    offset: u64,
}

impl TocGen {
    fn entry(&mut self, fields: std::fmt::Arguments) {
        if self.entries > 0 {
            self.json.push(',');
        }
        write!(self.json, r#"{{{fields},"modtime":"2024-05-06T07:08:09Z"}}"#).unwrap();
        self.entries += 1;
    }

    fn payload(&mut self, compressed_len: u64) -> u64 {
        let at = self.offset;
        self.offset += compressed_len;
        at
    }
}

/// An eStargz-style TOC of exactly [`TOC_ENTRIES`] entries: per directory 1 dir
/// (every 10th with an xattr), 13 one-chunk files, 3 files of 3 chunks (3 TOC
/// entries each), 1 symlink and 1 hard link = 25 entries. Directories are two
/// levels below implicit parents (`usr/share/gNN`), as in real layers.
/// Returns the JSON and the TOC offset (end of the chunk payload).
fn gen_toc() -> (Vec<u8>, u64) {
    let mut g = TocGen {
        json: String::with_capacity(TOC_ENTRIES * 220),
        entries: 0,
        offset: 512,
    };
    g.json.push_str(r#"{"version":1,"entries":["#);
    for d in 0..TOC_ENTRIES / 25 {
        let dir = format!("usr/share/g{:02}/pkg{d:04}", d / 100);
        let xattrs = if d % 10 == 0 {
            r#","xattrs":{"user.pkg":"MQ=="}"#
        } else {
            ""
        };
        g.entry(format_args!(r#""name":"{dir}/","type":"dir","mode":493{xattrs}"#));
        for f in 0..13u64 {
            let name = format!("{dir}/file{f:02}.so");
            let size = 200 + (d as u64 * 13 + f) % 8000;
            let at = g.payload(size / 3 + 40);
            let digest = Digest::of(name.as_bytes());
            g.entry(format_args!(
                r#""name":"{name}","type":"reg","size":{size},"mode":420,"offset":{at},"digest":"{digest}""#
            ));
        }
        for f in 0..3 {
            let name = format!("{dir}/big{f}.bin");
            let (chunk, at) = (4 * MIB, g.payload(MIB as u64));
            let digest = Digest::of(name.as_bytes());
            g.entry(format_args!(
                r#""name":"{name}","type":"reg","size":{},"mode":420,"offset":{at},"chunkSize":{chunk},"chunkDigest":"{digest}""#,
                3 * chunk
            ));
            for c in 1..3 {
                let at = g.payload(MIB as u64);
                let digest = Digest::of(format!("{name}#{c}").as_bytes());
                g.entry(format_args!(
                    r#""name":"{name}","type":"chunk","offset":{at},"chunkOffset":{},"chunkSize":{chunk},"chunkDigest":"{digest}""#,
                    c * chunk
                ));
            }
        }
        g.entry(format_args!(
            r#""name":"{dir}/current","type":"symlink","linkName":"file00.so","mode":511"#
        ));
        g.entry(format_args!(
            r#""name":"{dir}/file00.link","type":"hardlink","linkName":"{dir}/file00.so","mode":420"#
        ));
    }
    g.json.push_str("]}");
    assert_eq!(g.entries, TOC_ENTRIES);
    (g.json.into_bytes(), g.offset)
}

/// The blob's tail from the TOC on, as eStargz lays it out: a gzip member
/// holding a tar with `stargz.index.json`, then the 51-byte footer.
fn estargz_tail(json: &[u8], toc_offset: u64) -> Bytes {
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_data(&mut header, "stargz.index.json", json).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    let mut tail = gz.finish().unwrap();
    // Footer: an empty gzip member whose extra field "SG" carries the TOC offset.
    tail.extend_from_slice(&[0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0]);
    tail.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    tail.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    Bytes::from(tail)
}

fn index_build(c: &mut Criterion) {
    let (json, toc_offset) = gen_toc();
    let layer = Digest::of(b"bench layer");
    let tail = estargz_tail(&json, toc_offset);
    let size = toc_offset + tail.len() as u64;
    let toc_digest = Digest::of(&json);
    let parsed: Toc = serde_json::from_slice(&json).unwrap();
    let build = |toc: &Toc| toc::build(&layer, toc, Encoding::Gzip, toc_offset, size).unwrap();
    assert!(build(&parsed).resolve("usr/share/g39/pkg3999/big2.bin").is_some());

    let mut g = c.benchmark_group("index");
    // Iterations take hundreds of milliseconds: few samples of one iteration each,
    // rather than criterion's linear 1..=n ramp (55 iterations for 10 samples).
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(TOC_ENTRIES as u64));
    // Whole public entry point: footer, inflate TOC member, TOC digest, JSON, build.
    // The TOC work runs on tokio's blocking pool, as in the daemon.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    g.bench_function("estargz_100k_entries", |b| {
        b.iter(|| {
            let read = |off: u64, len: u64| {
                let at = (off - toc_offset) as usize;
                std::future::ready(Ok::<_, std::io::Error>(tail.slice(at..at + len as usize)))
            };
            rt.block_on(index_estargz(&layer, size, &toc_digest, read)).unwrap()
        })
    });
    g.bench_function("toc_json_parse_and_build_100k", |b| {
        b.iter(|| build(&serde_json::from_slice(black_box(&json)).unwrap()))
    });
    // Splits the above so a regression points at serde or at the builder.
    g.bench_function("build_only_100k", |b| b.iter(|| build(black_box(&parsed))));
    g.finish();
}

/// 1 MiB of random bytes (deflate/zstd fall back to stored blocks).
fn incompressible() -> Vec<u8> {
    let mut data = vec![0u8; MIB];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
    data
}

/// 1 MiB of log-like text (compresses about 9x).
fn compressible() -> Vec<u8> {
    let mut s = String::with_capacity(MIB + 100);
    for i in 0.. {
        if s.len() >= MIB {
            break;
        }
        let _ = writeln!(
            s,
            "{i:08} INFO served /usr/lib/x86_64/lib{}.so status=200 bytes={}",
            i % 97,
            i * 31 % 4096
        );
    }
    s.truncate(MIB);
    s.into_bytes()
}

fn chunk_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(MIB as u64));
    for (kind, data) in [("random", incompressible()), ("text", compressible())] {
        let gzip = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&data).unwrap();
            e.finish().unwrap()
        };
        let zstd = zstd::encode_all(&data[..], 3).unwrap();
        for (encoding, raw) in [(Encoding::Gzip, gzip), (Encoding::Zstd, zstd)] {
            let chunk = Chunk {
                file_offset: 0,
                len: data.len() as u64,
                blob_offset: 0,
                blob_len: raw.len() as u64,
                inner_offset: 0,
                encoding,
                digest: Some(Digest::of(&data)),
                whole: None,
            };
            let raw = Bytes::from(raw);
            eprintln!("chunk {encoding:?}/{kind}: 1 MiB stored as {} bytes", raw.len());
            // Same steps as the fetcher after a range read: decode, then verify.
            let id = BenchmarkId::new(format!("decode_verify_{encoding:?}").to_lowercase(), kind);
            g.bench_with_input(id, &raw, |b, raw| {
                b.iter(|| {
                    let d = decode(&chunk, raw).unwrap();
                    verify(&chunk, &d).unwrap();
                    d
                })
            });
        }
    }
    // The sha256 share of the above, and the whole cost of checking a disk-cache hit.
    let data = incompressible();
    let chunk = Chunk {
        file_offset: 0,
        len: MIB as u64,
        blob_offset: 0,
        blob_len: MIB as u64,
        inner_offset: 0,
        encoding: Encoding::Raw,
        digest: Some(Digest::of(&data)),
        whole: None,
    };
    g.bench_function("verify_sha256_1MiB", |b| {
        b.iter(|| verify(&chunk, black_box(&data)).unwrap())
    });
    g.finish();
}

fn key(layer: &Digest, i: usize) -> ChunkKey {
    ChunkKey {
        layer: layer.clone(),
        blob_offset: (i * MIB) as u64,
        inner_offset: 0,
    }
}

fn cache_lookup(c: &mut Criterion) {
    let layer = Digest::of(b"bench layer");
    let mut g = c.benchmark_group("cache");

    // 100k entries; they share one buffer, so the cache holds 6.25 GiB of
    // logical bytes (its limit is above that) in 64 KiB of memory.
    const MEM_ENTRIES: usize = 100_000;
    let mem = MemCache::new(8 << 30);
    let buf = Bytes::from(vec![1u8; 64 << 10]);
    let keys: Vec<ChunkKey> = (0..MEM_ENTRIES).map(|i| key(&layer, i)).collect();
    for k in &keys {
        mem.put(k.clone(), buf.clone());
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("mem_hit_100k_entries", |b| {
        // A stride through all keys, so hits move entries around the whole LRU list.
        let mut i = 0;
        b.iter(|| {
            i = (i + 7919) % MEM_ENTRIES;
            mem.get(&keys[i]).unwrap()
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let disk = DiskCache::open(dir.path(), 1 << 30).unwrap();
    for (entries, len, name) in [
        (10_000, 4 << 10, "disk_hit_4KiB_10k_entries"),
        (64, MIB, "disk_hit_1MiB_64_entries"),
    ] {
        let data = incompressible();
        // Distinct layers per case keep the key sets apart.
        let layer = Digest::of(name.as_bytes());
        let keys: Vec<ChunkKey> = (0..entries).map(|i| key(&layer, i)).collect();
        for k in &keys {
            disk.put(k, &data[..len]).unwrap();
        }
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function(name, |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7919) % entries;
                disk.get(&keys[i]).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, index_build, chunk_decode, cache_lookup);
criterion_main!(benches);
