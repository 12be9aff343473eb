//! Every Redis key name of a drop, in one place. Each is `fg:{<drop id>}:<name>`: the hash tag
//! `{drop_id}` keeps a drop on one Redis Cluster shard. The scripts never build key names; they
//! take them as KEYS in the orders listed here, which their headers (and lua/lib.lua's `K` table)
//! name — a test below reads the Lua files and checks that they agree.

use sha2::{Digest, Sha256};

use crate::ids::{DropId, FanId};

/// An idempotent reserve's digest: 32 hex digits of SHA-256 over the fan and their key, so a key
/// is scoped to the fan who sent it.
fn request_digest(fan: &FanId, key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(fan.as_str())
        .chain_update([0])
        .chain_update(key)
        .finalize();
    hex::encode(&digest[..16])
}

/// The key `name` of `drop`.
pub fn drop_key(drop: &DropId, name: &str) -> String {
    // Pushed into a string of the right size, not `format!`ed: a reserve names fourteen keys,
    // and `DropKeys::new` was ≈ 4 % of booking-api's CPU under reserve load (perf, 2026-12-06),
    // mostly `format!`'s machinery and the regrowing of its too-small first guess.
    let drop = drop.as_str();
    let mut key = String::with_capacity("fg:{}:".len() + drop.len() + name.len());
    key.push_str("fg:{");
    key.push_str(drop);
    key.push_str("}:");
    key.push_str(name);
    key
}

/// The Redis Cluster slot every key of `drop` lives in: the hash tag `{drop_id}` makes it the
/// slot of the drop id itself (CRC16 mod 16384, as Redis computes it).
pub fn drop_slot(drop: &DropId) -> u16 {
    fred::util::redis_keyslot(drop.as_str().as_bytes())
}

/// The keys every hold script takes, `KEYS[1]..KEYS[13]`, in lua/lib.lua's order (reserve adds its
/// idempotency key as `KEYS[14]`).
pub const HOLD_KEYS: [&str; 13] = [
    "meta",
    "stock",
    "seats",
    "holds",
    "deadlines",
    "confirming",
    "done",
    "fans",
    "expiries",
    "layout",
    "active",
    "seatmap",
    "shopping",
];

/// The live-hold index as releases before 2026-12-06 kept it (a zset of `<fan>|<hold id>`), in
/// the hold keys' place of [`HOLD_KEYS`]' `expiries` until 2026-12-07: nothing reads or writes it
/// now, and archiving a drop removes what is left of it.
pub const LEGACY_FANHOLDS_KEY: &str = "fanholds";

/// The rebuild's scratch zset (live hold id → created ms), the rebuild scripts' `KEYS[14]`
/// (lua/rebuild.lua).
pub const REBUILD_KEY: &str = "rebuild";

/// The refunds returned to stock (`"<order id>|<refund id>"` → `"1"`): lua/refund.lua's
/// `KEYS[14]`, and rebuild_fill.lua's when it writes the markers of Postgres' refunds.
pub const REFUNDS_KEY: &str = "refunds";

/// The rebuild scripts that take [`REBUILD_KEY`] after the hold keys, as their headers say.
pub const REBUILD_SCRIPTS: [(&str, &str); 4] = [
    ("rebuild", include_str!("../../lua/rebuild.lua")),
    ("rebuild_sort", include_str!("../../lua/rebuild_sort.lua")),
    ("rebuild_keep", include_str!("../../lua/rebuild_keep.lua")),
    (
        "rebuild_finish",
        include_str!("../../lua/rebuild_finish.lua"),
    ),
];

/// lua/join.lua's KEYS, in order.
pub const JOIN_KEYS: [&str; 11] = [
    "meta",
    "admission",
    "places",
    "line",
    "seq",
    "active",
    "seen",
    "sessions",
    "fans",
    "watermark",
    "shopping",
];

/// lua/admit.lua's KEYS, in order.
pub const ADMIT_KEYS: [&str; 14] = [
    "meta",
    "admission",
    "stock",
    "fans",
    "active",
    "line",
    "bucket",
    "watermark",
    "places",
    "seen",
    "sessions",
    "seq",
    "shopping",
    "offers",
];

/// lua/line_restore.lua's KEYS, in order.
pub const LINE_RESTORE_KEYS: [&str; 3] = ["meta", "seq", "watermark"];

/// The keys of one drop, in the order every hold script takes them.
#[derive(Debug, Clone)]
pub struct DropKeys {
    keys: Vec<String>,
}

impl DropKeys {
    pub fn new(drop: &DropId) -> Self {
        DropKeys {
            keys: HOLD_KEYS.iter().map(|k| drop_key(drop, k)).collect(),
        }
    }

    fn get(&self, name: &str) -> &str {
        let i = HOLD_KEYS
            .iter()
            .position(|k| *k == name)
            .expect("a known key name");
        &self.keys[i]
    }

    pub fn meta(&self) -> &str {
        self.get("meta")
    }
    pub fn stock(&self) -> &str {
        self.get("stock")
    }
    pub fn seats(&self) -> &str {
        self.get("seats")
    }
    pub fn seatmap(&self) -> &str {
        self.get("seatmap")
    }
    pub fn holds(&self) -> &str {
        self.get("holds")
    }
    pub fn confirming(&self) -> &str {
        self.get("confirming")
    }
    /// Fan id → units held, confirming or bought; "h|<fan id>" → the fan's live hold ids.
    pub fn fans(&self) -> &str {
        self.get("fans")
    }
    /// Hold ids in the order reserve made them: when each expires (lua/lib.lua `reclaim`).
    pub fn expiries(&self) -> &str {
        self.get("expiries")
    }
    /// Waiting-room settings ops change live (read by lua/admit.lua).
    pub fn admission(drop: &DropId) -> String {
        drop_key(drop, "admission")
    }

    /// The key an idempotent reserve's first answer lives under on a drop that keeps its answers
    /// in keys (lua/lib.lua, stored answers): scoped to drop, fan and key. It ends with the
    /// request's digest, 32 hex digits, which lua/reserve.lua takes from it to name the answer's
    /// field on a drop that keeps them in its holds hash ([`DropKeys::answer_field`]).
    pub fn idem(drop: &DropId, fan: &FanId, key: &str) -> String {
        drop_key(drop, &["idem:", &request_digest(fan, key)].concat())
    }

    /// The holds-hash field a reserve's first answer is stored under on a drop loaded by this
    /// release (meta `answers` = "holds"): [`DropKeys::ANSWER_PREFIX`] and the request's digest.
    pub fn answer_field(fan: &FanId, key: &str) -> String {
        [Self::ANSWER_PREFIX, &request_digest(fan, key)].concat()
    }

    /// What starts a stored answer's field in the holds hash (no hold id does: they start with
    /// the drop id).
    pub const ANSWER_PREFIX: &'static str = "i:";

    /// All of them, `KEYS[1]..KEYS[13]`.
    pub fn all(&self) -> Vec<String> {
        self.keys.clone()
    }

    /// Every key of the drop lua/archive.lua removes: meta and stock first (it reads them), then
    /// the rest of the hold scripts', the waiting room's and the rebuild's, each once. Not the
    /// idempotency keys, which expire by themselves within hold TTL + 10 minutes of the last
    /// reserve (and are many: one per reserve).
    pub fn every(drop: &DropId) -> Vec<String> {
        let mut names: Vec<&str> = Vec::new();
        let all = HOLD_KEYS
            .iter()
            .chain(JOIN_KEYS.iter())
            .chain(ADMIT_KEYS.iter())
            .chain(["admission", REBUILD_KEY, REFUNDS_KEY, LEGACY_FANHOLDS_KEY].iter());
        for name in all {
            if !names.contains(name) {
                names.push(name);
            }
        }
        names.into_iter().map(|name| drop_key(drop, name)).collect()
    }

    /// lua/refund.lua's keys (and rebuild_fill.lua's for its refund markers): all of them and
    /// the refund markers, `KEYS[1]..KEYS[14]`.
    pub fn refund(drop: &DropId) -> Vec<String> {
        let mut keys = DropKeys::new(drop).all();
        keys.push(drop_key(drop, REFUNDS_KEY));
        keys
    }

    /// The rebuild scripts' keys: all of them and the scratch zset, `KEYS[1]..KEYS[14]`.
    pub fn rebuild(drop: &DropId) -> Vec<String> {
        let mut keys = DropKeys::new(drop).all();
        keys.push(drop_key(drop, REBUILD_KEY));
        keys
    }
}

/// The waiting room's keys of one drop.
#[derive(Debug, Clone)]
pub struct QueueKeys {
    pub meta: String,
    pub admission: String,
    pub stock: String,
    pub fans: String,
    pub active: String,
    pub places: String,
    pub line: String,
    pub seq: String,
    pub bucket: String,
    pub watermark: String,
    pub seen: String,
    /// Admitted fan → `"<shop end ms>:<hard end ms>"` (lua/admit.lua).
    pub sessions: String,
    /// Fan → shop end ms, for each fan admission's running sum counts (lua/lib.lua).
    pub shopping: String,
    /// Fan → offer end ms: the fans the waiting list offered a unit (lua/admit.lua).
    pub offers: String,
}

impl QueueKeys {
    pub fn new(drop: &DropId) -> QueueKeys {
        let k = |name: &str| drop_key(drop, name);
        QueueKeys {
            meta: k("meta"),
            admission: k("admission"),
            stock: k("stock"),
            fans: k("fans"),
            active: k("active"),
            places: k("places"),
            line: k("line"),
            seq: k("seq"),
            bucket: k("bucket"),
            watermark: k("watermark"),
            seen: k("seen"),
            sessions: k("sessions"),
            shopping: k("shopping"),
            offers: k("offers"),
        }
    }

    fn named(&self, name: &str) -> String {
        match name {
            "meta" => &self.meta,
            "admission" => &self.admission,
            "stock" => &self.stock,
            "fans" => &self.fans,
            "active" => &self.active,
            "places" => &self.places,
            "line" => &self.line,
            "seq" => &self.seq,
            "bucket" => &self.bucket,
            "watermark" => &self.watermark,
            "seen" => &self.seen,
            "sessions" => &self.sessions,
            "shopping" => &self.shopping,
            "offers" => &self.offers,
            // JOIN_KEYS and ADMIT_KEYS name only the fields above (the test below checks it).
            other => unreachable!("no queue key {other}"),
        }
        .clone()
    }

    /// lua/join.lua's KEYS.
    pub fn join(&self) -> Vec<String> {
        JOIN_KEYS.iter().map(|k| self.named(k)).collect()
    }

    /// lua/line_restore.lua's KEYS.
    pub fn line_restore(&self) -> Vec<String> {
        LINE_RESTORE_KEYS.iter().map(|k| self.named(k)).collect()
    }

    /// lua/admit.lua's KEYS.
    pub fn admit(&self) -> Vec<String> {
        ADMIT_KEYS.iter().map(|k| self.named(k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_key_is_hash_tagged_by_the_drop() {
        let drop = DropId::generate();
        assert_eq!(drop_key(&drop, "meta"), format!("fg:{{{drop}}}:meta"));
        let fan = FanId::parse("fan-1").unwrap();
        let idem = DropKeys::idem(&drop, &fan, "k");
        assert!(idem.starts_with(&format!("fg:{{{drop}}}:idem:")), "{idem}");
        assert_eq!(idem.len(), format!("fg:{{{drop}}}:idem:").len() + 32);
    }

    /// The names after `{drop_id}:` in a script header's `-- KEYS[i] {drop_id}:name` lines.
    fn header_keys(lua: &str) -> Vec<String> {
        lua.lines()
            .filter_map(|l| l.strip_prefix("-- KEYS["))
            .filter_map(|l| l.split_once("{drop_id}:"))
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn lib_lua_names_the_hold_keys_in_the_same_order() {
        let lib = include_str!("../../lua/lib.lua");
        // The header's `-- KEYS[i]  {drop_id}:name` lines, and the `K` table's `name = KEYS[i]`.
        let header = header_keys(lib);
        assert_eq!(&header[..HOLD_KEYS.len()], HOLD_KEYS);
        let table = lib
            .split_once("K = {")
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(body, _)| body)
            .expect("lib.lua has a K table");
        // `name = KEYS[i]` pairs, read exactly (not as substrings: `holds` is in `fanholds`).
        let pairs: Vec<(String, String)> = table
            .split(',')
            .filter_map(|p| p.split_once('='))
            .map(|(n, k)| (n.trim().to_owned(), k.trim().to_owned()))
            .filter(|(n, _)| !n.is_empty())
            .collect();
        let mut expected: Vec<(String, String)> = HOLD_KEYS
            .iter()
            .enumerate()
            .map(|(i, name)| ((*name).to_owned(), format!("KEYS[{}]", i + 1)))
            .collect();
        expected.push(("idem".into(), "KEYS[14]".into()));
        assert_eq!(pairs, expected, "lib.lua's K table");
    }

    #[test]
    fn join_and_admit_headers_name_their_keys_in_the_same_order() {
        assert_eq!(header_keys(include_str!("../../lua/join.lua")), JOIN_KEYS);
        assert_eq!(header_keys(include_str!("../../lua/admit.lua")), ADMIT_KEYS);
        assert_eq!(
            header_keys(include_str!("../../lua/line_restore.lua")),
            LINE_RESTORE_KEYS
        );
        let drop = DropId::generate();
        let q = QueueKeys::new(&drop);
        for (i, name) in ADMIT_KEYS.iter().enumerate() {
            assert_eq!(q.admit()[i], drop_key(&drop, name));
        }
        for (i, name) in JOIN_KEYS.iter().enumerate() {
            assert_eq!(q.join()[i], drop_key(&drop, name));
        }
    }

    #[test]
    fn rebuild_scripts_name_the_scratch_key_after_the_hold_keys() {
        for (name, lua) in REBUILD_SCRIPTS {
            let header = header_keys(lua);
            assert_eq!(header, [REBUILD_KEY], "{name}.lua's KEYS[14]");
            assert!(
                lua.contains(&format!("-- KEYS[14] {{drop_id}}:{REBUILD_KEY} ")),
                "{name}.lua names its KEYS[14]"
            );
        }
        let drop = DropId::generate();
        let keys = DropKeys::rebuild(&drop);
        assert_eq!(keys[..HOLD_KEYS.len()], DropKeys::new(&drop).all()[..]);
        assert_eq!(keys[HOLD_KEYS.len()], drop_key(&drop, REBUILD_KEY));
    }

    #[test]
    fn refund_names_the_markers_after_the_hold_keys() {
        assert_eq!(
            header_keys(include_str!("../../lua/refund.lua")),
            [REFUNDS_KEY]
        );
        assert_eq!(
            header_keys(include_str!("../../lua/rebuild_fill.lua")),
            [REFUNDS_KEY]
        );
        let drop = DropId::generate();
        let keys = DropKeys::refund(&drop);
        assert_eq!(keys[..HOLD_KEYS.len()], DropKeys::new(&drop).all()[..]);
        assert_eq!(keys[HOLD_KEYS.len()], drop_key(&drop, REFUNDS_KEY));
    }

    #[test]
    fn archive_takes_meta_and_stock_first_and_every_key_once() {
        let drop = DropId::generate();
        let every = DropKeys::every(&drop);
        assert_eq!(every[0], drop_key(&drop, "meta"));
        assert_eq!(every[1], drop_key(&drop, "stock"));
        let unique: std::collections::HashSet<&String> = every.iter().collect();
        assert_eq!(unique.len(), every.len(), "a key twice: {every:?}");
        let named = HOLD_KEYS
            .iter()
            .chain(&JOIN_KEYS)
            .chain(&ADMIT_KEYS)
            .chain(&["admission", REBUILD_KEY, REFUNDS_KEY]);
        for name in named {
            assert!(
                every.contains(&drop_key(&drop, name)),
                "{name} is left behind"
            );
        }
        let header = header_keys(include_str!("../../lua/archive.lua"));
        assert_eq!(header, ["meta", "stock"], "archive.lua's KEYS[1], KEYS[2]");
    }

    /// On a Redis Cluster a script may only touch keys of one slot (else `CROSSSLOT`): each
    /// script's key set, as the engine passes it, hashes (CRC16 of the first `{...}`, as Redis
    /// computes it) to the slot of the drop id itself, whatever the id.
    #[test]
    fn every_scripts_keys_hash_to_the_drops_slot() {
        use fred::util::redis_keyslot;
        let fan = FanId::parse("fan-1").expect("a fan id");
        for _ in 0..200 {
            let drop = DropId::generate();
            let slot = drop_slot(&drop);
            let mut hold_keys = DropKeys::new(&drop).all();
            hold_keys.push(DropKeys::idem(&drop, &fan, "k"));
            let q = QueueKeys::new(&drop);
            let sets: [(&str, Vec<String>); 8] = [
                ("hold scripts and reserve's idempotency key", hold_keys),
                ("rebuild scripts", DropKeys::rebuild(&drop)),
                ("refund", DropKeys::refund(&drop)),
                ("archive", DropKeys::every(&drop)),
                ("join", q.join()),
                ("admit", q.admit()),
                ("line_restore", q.line_restore()),
                ("admission settings", vec![DropKeys::admission(&drop)]),
            ];
            for (what, keys) in sets {
                for key in keys {
                    assert_eq!(
                        redis_keyslot(key.as_bytes()),
                        slot,
                        "{what}: {key} is not in drop {drop}'s slot {slot}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_key_carries_the_drop_hash_tag() {
        let drop = DropId::generate();
        let fan = FanId::parse("fan-1").expect("a fan id");
        let tag = format!("{{{drop}}}");
        let mut all = DropKeys::new(&drop).all();
        all.extend(QueueKeys::new(&drop).admit());
        all.extend(QueueKeys::new(&drop).join());
        all.push(DropKeys::admission(&drop));
        all.extend(DropKeys::rebuild(&drop));
        all.extend(DropKeys::refund(&drop));
        all.extend(DropKeys::every(&drop));
        all.push(DropKeys::idem(&drop, &fan, "k"));
        for key in all {
            assert!(key.contains(&tag), "{key} lacks the hash tag {tag}");
        }
    }
}
