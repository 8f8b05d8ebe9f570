//! Which recovery points a site merges away, as a pure function of its
//! chain: the last `keep` points stay, and so does every point held by a
//! failover (a failed-over disk names that point's layer as its parent).
//!
//! A merge takes a run of layers `target..=last` (indices into the chain,
//! bottom first): layers `target+1..=last` are copied down into `target`'s
//! file, which then holds point `last`. Points `target..last` disappear
//! (their chains change), point `last` stays under another file, and the
//! layer above the run is relinked to the target. So every layer of the
//! run and the one above it must be unheld, and every point but `last`
//! droppable: a held layer's file is never written, nor its parent's.

/// One layer of the site's chain, as retention sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// A failover holds this point: its layer is never written nor removed.
    pub held: bool,
}

/// A merge to do: layers `target+1..=last` into `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub target: usize,
    pub last: usize,
}

/// The lowest merge that brings the chain closer to `keep` points (at
/// least 1), or `None` when nothing may be merged.
pub fn plan(chain: &[Slot], keep: usize) -> Option<Run> {
    let keep = keep.max(1);
    let n = chain.len();
    let droppable = |i: usize| !chain[i].held && i + keep < n;
    let mut target = 0;
    while target < n {
        if droppable(target) {
            let mut last = target;
            while droppable(last) && last + 1 < n && !chain[last + 1].held {
                last += 1;
            }
            // The run's child is relinked: never a held layer's file.
            if last + 1 < n && chain[last + 1].held {
                last = last.saturating_sub(1);
            }
            if last > target {
                return Some(Run { target, last });
            }
        }
        target += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(spec: &str) -> Vec<Slot> {
        spec.chars().map(|c| Slot { held: c == 'H' }).collect()
    }

    /// Applies plans until none is left; returns the surviving slots.
    fn settle(mut c: Vec<Slot>, keep: usize) -> Vec<Slot> {
        for _ in 0..c.len() {
            match plan(&c, keep) {
                Some(r) => {
                    assert!(r.target < r.last && r.last < c.len());
                    assert!(c[r.target..=r.last].iter().all(|s| !s.held));
                    let last = c[r.last];
                    c.splice(r.target..=r.last, [last]);
                }
                None => return c,
            }
        }
        panic!("plans did not settle");
    }

    #[test]
    fn keeps_the_last_points_and_merges_the_rest_into_the_base() {
        assert_eq!(plan(&chain("....."), 3), Some(Run { target: 0, last: 2 }));
        assert_eq!(settle(chain("....."), 3).len(), 3);
        assert_eq!(plan(&chain("..."), 3), None);
        assert_eq!(plan(&chain("..."), 5), None);
        // keep 0 means 1: the newest point always stays.
        assert_eq!(plan(&chain("...."), 0), Some(Run { target: 0, last: 3 }));
        assert_eq!(plan(&chain("."), 1), None);
        assert_eq!(plan(&chain(""), 1), None);
    }

    #[test]
    fn held_points_are_neither_targets_nor_merged() {
        // The base is held: merging starts above it.
        assert_eq!(plan(&chain("H...."), 2), Some(Run { target: 1, last: 3 }));
        // A point just above a droppable one blocks merging into it.
        assert_eq!(plan(&chain(".H...."), 2), Some(Run { target: 2, last: 4 }));
        assert_eq!(settle(chain(".H...."), 2), chain(".H.."));
        // A held point inside the old ones splits the runs; the layer below
        // it (its parent) stays as it is.
        assert_eq!(
            plan(&chain("...H....."), 2),
            Some(Run { target: 0, last: 1 })
        );
        assert_eq!(settle(chain("...H....."), 2), chain("..H.."));
        assert_eq!(settle(chain("HHHH"), 1), chain("HHHH"));
        assert_eq!(settle(chain("..H"), 1), chain("..H"));
        // A held newest point: the ones below merge, but for its parent.
        assert_eq!(settle(chain("....H"), 1), chain("..H"));
    }
}
