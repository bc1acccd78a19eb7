//! Which account a turn goes to (docs/DESIGN.md#routing), pure: eligible accounts before
//! cooling ones, lower `priority` first, and within a priority the turn's **sticky** account
//! (the one that served the last turn of the same prompt cache or client session), then the
//! others in weighted rendezvous order — the same affinity lands on the same account on every
//! relay, and accounts without one share turns by `weight`.

use sha2::{Digest, Sha256};

/// One account as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub priority: i32,
    pub weight: u32,
    /// Cooling down or disabled: tried only when nothing else can take the turn.
    pub cooling: bool,
    /// The account a session holds a lease on (its connection carries the session's chain).
    pub held: bool,
}

/// What makes turns share an account: the request's `prompt_cache_key`, else the client's
/// session id (Codex's `session-id`); stored hashed (it is the client's text).
pub fn affinity_key(prompt_cache_key: Option<&str>, session: Option<&str>) -> Option<String> {
    let short = |s: &str| hex::encode(&Sha256::digest(s.as_bytes())[..12]);
    prompt_cache_key
        .filter(|k| !k.is_empty())
        .map(|k| format!("pck:{}", short(k)))
        .or_else(|| {
            session
                .filter(|s| !s.is_empty())
                .map(|s| format!("sid:{}", short(s)))
        })
}

/// A seed for the rendezvous order: from the affinity key (the same on every relay), else from
/// any per-session or per-request text.
pub fn seed_of(text: &str) -> u64 {
    let d = Sha256::digest(text.as_bytes());
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Weighted rendezvous score of `name` for `seed`: higher first. With uniform `u` in (0, 1),
/// `-weight / ln(u)` puts an account first with probability weight / total weight.
fn score(seed: u64, name: &str, weight: u32) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(name.as_bytes());
    let d = h.finalize();
    let bits = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    // (0, 1): never 0 (ln 0) nor 1 (ln 1 = 0).
    let u = crate::num::unit_interval(bits);
    -f64::from(weight.max(1)) / u.ln()
}

/// The indices of `candidates` in the order a turn tries them.
pub fn order(candidates: &[Candidate<'_>], sticky: Option<&str>, seed: u64) -> Vec<usize> {
    // (cooling, priority, not held, not sticky): smaller first.
    type Rank = (bool, i32, bool, bool);
    let mut keyed: Vec<(usize, Rank, f64)> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let rank = (c.cooling, c.priority, !c.held, sticky != Some(c.name));
            (i, rank, score(seed, c.name, c.weight))
        })
        .collect();
    keyed.sort_by(|a, b| a.1.cmp(&b.1).then(b.2.total_cmp(&a.2)));
    keyed.into_iter().map(|(i, _, _)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, priority: i32, weight: u32) -> Candidate<'_> {
        Candidate {
            name,
            priority,
            weight,
            cooling: false,
            held: false,
        }
    }

    #[test]
    fn affinity_prefers_the_cache_key_and_hides_the_text() {
        let k = affinity_key(Some("my-cache"), Some("sess")).unwrap();
        assert!(k.starts_with("pck:") && !k.contains("my-cache") && k.len() == 4 + 24);
        assert!(
            affinity_key(None, Some("sess"))
                .unwrap()
                .starts_with("sid:")
        );
        assert_eq!(affinity_key(Some(""), None), None);
        assert_eq!(
            affinity_key(Some("x"), None),
            affinity_key(Some("x"), Some("other"))
        );
    }

    #[test]
    fn eligibility_then_priority_then_sticky() {
        let mut c = vec![cand("a", 1, 1), cand("b", 0, 1), cand("c", 0, 1)];
        let names = |c: &[Candidate<'_>], sticky, seed| -> Vec<String> {
            order(c, sticky, seed)
                .into_iter()
                .map(|i| c[i].name.to_string())
                .collect()
        };
        for seed in 0..50 {
            let o = names(&c, Some("c"), seed);
            assert_eq!(&o[..2], ["c", "b"], "sticky first within the best priority");
            assert_eq!(o[2], "a");
            // A sticky account of a worse priority does not jump the better one.
            assert_eq!(names(&c, Some("a"), seed)[2], "a");
        }
        c[2].cooling = true;
        assert_eq!(names(&c, Some("c"), 7), ["b", "a", "c"]);
        c[2].cooling = false;
        c[1].held = true;
        assert_eq!(names(&c, Some("c"), 7)[0], "b", "the held lease first");
    }

    #[test]
    fn the_same_seed_the_same_account_and_weights_share() {
        let c = vec![cand("a", 0, 3), cand("b", 0, 1)];
        assert_eq!(order(&c, None, 42), order(&c, None, 42));
        let first_a = (0..4000u64)
            .filter(|s| order(&c, None, seed_of(&s.to_string()))[0] == 0)
            .count();
        assert!((2850..=3150).contains(&first_a), "3:1 → {first_a} of 4000");
        // Adding an account moves only the seeds it wins (rendezvous).
        let c3 = vec![cand("a", 0, 3), cand("b", 0, 1), cand("z", 0, 1)];
        let moved = (0..4000u64)
            .map(|s| seed_of(&s.to_string()))
            .filter(|&s| {
                let before = order(&c, None, s)[0];
                let after = order(&c3, None, s)[0];
                after != before && after != 2
            })
            .count();
        assert_eq!(moved, 0);
    }
}
