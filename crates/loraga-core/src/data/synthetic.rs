//! GSM8K-style arithmetic word problems that the project writes itself, so that a demo needs
//! nothing beyond the package registries. Each problem is one of a few templates filled with
//! seeded random names, objects and numbers; its answer is a worked solution in GSM8K's style
//! (calculator annotations `<<a+b=c>>`, one step a line) ending in `#### <n>`. Every
//! intermediate and final number is a non-negative integer.
//!
//! The same (n, seed) gives the same problems everywhere (ChaCha8, our own bounded draws).

use rand_chacha::ChaCha8Rng;

use super::jsonl::Record;
use super::loader::{below, keyed_rng};

const NAMES: &[(&str, &str)] = &[
    ("Ava", "she"),
    ("Ben", "he"),
    ("Carla", "she"),
    ("Dev", "he"),
    ("Elena", "she"),
    ("Farid", "he"),
    ("Grace", "she"),
    ("Hiro", "he"),
    ("Ines", "she"),
    ("Jamal", "he"),
    ("Kira", "she"),
    ("Liam", "he"),
];
const THINGS: &[&str] = &["apples", "stickers", "pencils", "marbles", "books", "shells", "cards", "stamps"];

/// `n` problems from `seed`.
pub fn problems(n: usize, seed: u64) -> Vec<Record> {
    // The second key word keeps these draws apart from the loader's epoch streams.
    let mut rng = keyed_rng(seed, u64::MAX);
    (0..n).map(|_| problem(&mut rng)).collect()
}

/// A number in lo..=hi.
fn num(rng: &mut ChaCha8Rng, lo: usize, hi: usize) -> usize {
    lo + below(rng, hi - lo + 1)
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, xs: &'a [T]) -> &'a T {
    &xs[below(rng, xs.len())]
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

fn problem(rng: &mut ChaCha8Rng) -> Record {
    let &(name, he) = pick(rng, NAMES);
    let he_cap = cap(he);
    let thing = *pick(rng, THINGS);
    let friend = loop {
        let &(f, _) = pick(rng, NAMES);
        if f != name {
            break f;
        }
    };
    let (prompt, steps, answer) = match below(rng, 7) {
        0 => {
            let (a, b) = (num(rng, 5, 60), num(rng, 2, 40));
            let c = num(rng, 1, a + b - 1);
            let (s, r) = (a + b, a + b - c);
            (
                format!(
                    "{name} has {a} {thing}. {he_cap} buys {b} more and then gives {c} to {friend}. How many {thing} does {name} have now?"
                ),
                format!(
                    "After buying more, {name} has {a} + {b} = <<{a}+{b}={s}>>{s} {thing}.\nAfter giving {c} away, {he} has {s} - {c} = <<{s}-{c}={r}>>{r} {thing}."
                ),
                r,
            )
        }
        1 => {
            let (k, p) = (num(rng, 2, 9), num(rng, 2, 12));
            let t = k * p;
            let bill = *[20, 50, 100, 200].iter().find(|&&b| b > t).unwrap_or(&200);
            let r = bill - t;
            (
                format!(
                    "{name} buys {k} boxes of {thing} that cost ${p} each. {he_cap} pays with a ${bill} bill. How much change does {he} get?"
                ),
                format!(
                    "The boxes cost {k} * {p} = $<<{k}*{p}={t}>>{t}.\nThe change is {bill} - {t} = $<<{bill}-{t}={r}>>{r}."
                ),
                r,
            )
        }
        2 => {
            let (p, w) = (num(rng, 3, 40), num(rng, 2, 6));
            let d = w * 7;
            let r = d * p;
            (
                format!("{name} reads {p} pages every day. How many pages does {he} read in {w} weeks?"),
                format!(
                    "{w} weeks have {w} * 7 = <<{w}*7={d}>>{d} days.\n{name} reads {d} * {p} = <<{d}*{p}={r}>>{r} pages."
                ),
                r,
            )
        }
        3 => {
            let (k, q) = (num(rng, 2, 9), num(rng, 2, 15));
            let t = k * q;
            (
                format!(
                    "{name} has {t} {thing} and shares them equally among {k} friends, keeping none. How many {thing} does each friend get?"
                ),
                format!("Each friend gets {t} / {k} = <<{t}/{k}={q}>>{q} {thing}."),
                q,
            )
        }
        4 => {
            let (a, b, c) = (num(rng, 4, 24), num(rng, 2, 9), num(rng, 1, 20));
            let x = a * b;
            let r = x + c;
            (
                format!(
                    "A box holds {a} {thing}. {name} has {b} full boxes and {c} loose {thing}. How many {thing} does {name} have in total?"
                ),
                format!(
                    "The boxes hold {b} * {a} = <<{b}*{a}={x}>>{x} {thing}.\nIn total {name} has {x} + {c} = <<{x}+{c}={r}>>{r} {thing}."
                ),
                r,
            )
        }
        5 => {
            let (w, h, g) = (num(rng, 8, 30), num(rng, 2, 9), num(rng, 2, 9));
            let t = h + g;
            let r = t * w;
            (
                format!(
                    "{name} earns ${w} an hour. {he_cap} works {h} hours on Monday and {g} hours on Tuesday. How much does {he} earn in the two days?"
                ),
                format!(
                    "{he_cap} works {h} + {g} = <<{h}+{g}={t}>>{t} hours.\n{he_cap} earns {t} * {w} = $<<{t}*{w}={r}>>{r}."
                ),
                r,
            )
        }
        _ => {
            let h = num(rng, 3, 40);
            let n = 2 * h;
            let c = num(rng, 1, h - 1);
            let r = h - c;
            (
                format!(
                    "{name} has {n} {thing}. {he_cap} gives half of them to {friend} and then loses {c}. How many {thing} does {name} have left?"
                ),
                format!(
                    "Half of {n} is {n} / 2 = <<{n}/2={h}>>{h}.\nAfter losing {c}, {name} has {h} - {c} = <<{h}-{c}={r}>>{r} {thing} left."
                ),
                r,
            )
        }
    };
    Record { prompt, response: format!("{steps}\n#### {answer}") }
}
