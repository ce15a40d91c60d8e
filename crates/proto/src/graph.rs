//! The graph of a saga's steps as the API sends it (each step's name and the names in its
//! `after`), for clients that draw it: sagactl's tree and table, the console's SVG.

use std::collections::HashMap;

/// For each step, the indices of the steps it waits for. Unknown names and a step naming itself
/// are left out; a name used twice resolves to its first step.
pub fn resolve_after<'a>(steps: impl Iterator<Item = (&'a str, &'a [String])>) -> Vec<Vec<usize>> {
    let steps: Vec<_> = steps.collect();
    let mut index = HashMap::new();
    for (i, (name, _)) in steps.iter().enumerate() {
        index.entry(*name).or_insert(i);
    }
    steps
        .iter()
        .enumerate()
        .map(|(i, (_, after))| {
            let mut d: Vec<usize> = after
                .iter()
                .filter_map(|a| index.get(a.as_str()).copied())
                .filter(|&d| d != i)
                .collect();
            d.sort_unstable();
            d.dedup();
            d
        })
        .collect()
}

/// Each step's depth: 0 for a root, else one more than its deepest `after`. Names it does not
/// know count as roots; a cycle (which the server never sends) stops deepening after as many
/// rounds as there are steps.
pub fn depths<'a>(steps: impl Iterator<Item = (&'a str, &'a [String])>) -> Vec<usize> {
    let deps = resolve_after(steps);
    let mut depth = vec![0usize; deps.len()];
    for _ in 0..deps.len() {
        let mut changed = false;
        for (i, ds) in deps.iter().enumerate() {
            let d = ds
                .iter()
                .filter_map(|&j| depth.get(j).map(|d| d + 1))
                .max()
                .unwrap_or(0);
            if let Some(slot) = depth.get_mut(i)
                && *slot != d
            {
                *slot = d;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(spec: &[(&'static str, &[&str])]) -> Vec<(&'static str, Vec<String>)> {
        spec.iter()
            .map(|(n, a)| (*n, a.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn a_fork_and_its_join() {
        let s = steps(&[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])]);
        let it = || s.iter().map(|(n, a)| (*n, a.as_slice()));
        assert_eq!(
            resolve_after(it()),
            vec![vec![], vec![0], vec![0], vec![1, 2]]
        );
        assert_eq!(depths(it()), vec![0, 1, 1, 2]);
    }

    #[test]
    fn unknown_names_self_edges_and_cycles_end() {
        let s = steps(&[("a", &["ghost", "a", "b"]), ("b", &["a"])]);
        let d = depths(s.iter().map(|(n, a)| (*n, a.as_slice())));
        // It ends (the rounds are bounded), and the self edge and unknown name count for nothing.
        assert_eq!(d.len(), 2);
        let s = steps(&[("a", &["ghost", "a"])]);
        assert_eq!(depths(s.iter().map(|(n, a)| (*n, a.as_slice()))), vec![0]);
    }
}
