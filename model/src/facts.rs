//! Invented personal facts ("Where does Valentina work?" -> "Valentina works at Torvex
//! Labs."), for measuring what an adapter learned: no base model knows them, each has one
//! exact answer, and they split into users' shards. Deterministic in the seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::dataset::AlpacaItem;

/// First names, one per fact (so a question never has two answers).
const NAMES: [&str; 64] = [
    "Valentina",
    "Oskar",
    "Priya",
    "Mateo",
    "Ingrid",
    "Kwame",
    "Sofia",
    "Hiroshi",
    "Amara",
    "Lukas",
    "Noor",
    "Tomasz",
    "Elena",
    "Rafael",
    "Yuki",
    "Desmond",
    "Freya",
    "Anand",
    "Chiara",
    "Bjorn",
    "Leila",
    "Marcus",
    "Ximena",
    "Dmitri",
    "Aisha",
    "Gustavo",
    "Hana",
    "Olusegun",
    "Marta",
    "Ravi",
    "Sienna",
    "Tariq",
    "Camille",
    "Emeka",
    "Greta",
    "Jonas",
    "Keiko",
    "Lorenzo",
    "Maeve",
    "Nikolai",
    "Paloma",
    "Quentin",
    "Rosalind",
    "Stellan",
    "Thandiwe",
    "Ulrich",
    "Vesna",
    "Wendell",
    "Yasmin",
    "Zoltan",
    "Agnieszka",
    "Bruno",
    "Celeste",
    "Dario",
    "Esme",
    "Fintan",
    "Giulia",
    "Hamid",
    "Isolde",
    "Jarrah",
    "Kirsi",
    "Lionel",
    "Mireille",
    "Nadim",
];
const PREFIXES: [&str; 12] = [
    "Velt", "Quor", "Zan", "Brix", "Lum", "Tor", "Kest", "Nov", "Plin", "Drav", "Orr", "Sab",
];
const SUFFIXES: [&str; 8] = ["rix", "ova", "ent", "ique", "ara", "ex", "ion", "ulo"];
const KINDS: [&str; 6] = ["Labs", "Systems", "Works", "Group", "Dynamics", "Studio"];

/// The most facts [`facts`] makes (one per name).
pub const MAX_FACTS: usize = NAMES.len();

/// One fact: a question and its one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// "Where does Valentina work?"
    pub question: String,
    /// "Valentina works at Torvex Labs."
    pub answer: String,
}

impl Fact {
    /// The fact as a training item.
    pub fn item(&self) -> AlpacaItem {
        AlpacaItem {
            instruction: self.question.clone(),
            input: String::new(),
            output: self.answer.clone(),
        }
    }
}

/// `n` facts (at most [`MAX_FACTS`]), each naming a different person and a different invented
/// company.
pub fn facts(n: usize, seed: u64) -> Vec<Fact> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut companies: Vec<String> = Vec::new();
    for _ in 0..n.min(MAX_FACTS) {
        let company = loop {
            let c = format!(
                "{}{} {}",
                PREFIXES[rng.gen_range(0..PREFIXES.len())],
                SUFFIXES[rng.gen_range(0..SUFFIXES.len())],
                KINDS[rng.gen_range(0..KINDS.len())]
            );
            if !companies.contains(&c) {
                break c;
            }
        };
        companies.push(company);
    }
    NAMES
        .iter()
        .zip(companies)
        .map(|(name, company)| Fact {
            question: format!("Where does {name} work?"),
            answer: format!("{name} works at {company}."),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_distinct_and_reproducible() {
        let a = facts(48, 1);
        assert_eq!(a.len(), 48);
        assert_eq!(a, facts(48, 1));
        assert_ne!(a, facts(48, 2));
        let mut q: Vec<&str> = a.iter().map(|f| f.question.as_str()).collect();
        q.sort();
        q.dedup();
        assert_eq!(q.len(), 48);
        let mut c: Vec<&str> = a
            .iter()
            .map(|f| f.answer.split(" at ").nth(1).unwrap_or(""))
            .collect();
        c.sort();
        c.dedup();
        assert_eq!(c.len(), 48);
        assert_eq!(facts(500, 1).len(), MAX_FACTS);
    }
}
