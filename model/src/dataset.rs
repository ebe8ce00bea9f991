//! Training data: Alpaca and ShareGPT files (a JSON array or JSONL), rendered with the model's chat
//! template into token ids with an assistant-only loss mask, and grouped into batches.
//!
//! ```text
//!  file ──load_file──▶ Vec<Conversation> ──encode_conversations(model)──▶ Vec<Example>
//!                      (errors name file, item, problem)    (ids, targets; truncated to max len)
//!  Example lengths ──length_grouped_batches(seed, epoch)──▶ batches of example indices
//! ```
//!
//! An example is rendered exactly as `hive-node chat` renders a conversation (the same template,
//! no BOS added), so what the adapter learns is what chat will ask it. Only the assistant turns'
//! tokens (their text and the template's end-of-turn marker) are targets; system and user turns and
//! the template's role headers are context.

use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::chat::{ChatTemplate, Message, Role};
use crate::error::{ModelError, Result};
use crate::loader::BaseModel;
use crate::tokenizer::Tokenizer;

/// One training conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// Its turns, in order; at least one is the assistant's.
    pub messages: Vec<Message>,
}

/// An Alpaca-form item: `instruction`, optional `input`, `output` (and an optional `system`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlpacaItem {
    /// The task.
    pub instruction: String,
    /// Extra context for the task (may be empty).
    #[serde(default)]
    pub input: String,
    /// The answer to learn.
    pub output: String,
}

impl AlpacaItem {
    /// The item as a user turn (instruction, then the input after a blank line when present) and
    /// an assistant turn.
    pub fn to_conversation(&self) -> Conversation {
        let user = if self.input.trim().is_empty() {
            self.instruction.clone()
        } else {
            format!("{}\n\n{}", self.instruction, self.input)
        };
        Conversation {
            messages: vec![
                Message::new(Role::User, user),
                Message::new(Role::Assistant, self.output.clone()),
            ],
        }
    }
}

/// Reads a data file: a JSON array of items, or JSONL (one item per line; blank lines skipped).
/// Items are Alpaca (`instruction`/`input`/`output`) or ShareGPT (`conversations` of
/// `{from, value}` with roles human/user, gpt/assistant, system; `messages` of `{role, content}`
/// is accepted too). Any bad item is an error naming the file, the item index and the problem.
pub fn load_file(path: &Path) -> Result<Vec<Conversation>> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Dataset {
        path: path.to_path_buf(),
        index: None,
        reason: format!("cannot read: {e}"),
    })?;
    parse(path, &text)
}

/// [`load_file`] on text already read; `path` is only used in errors.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Conversation>> {
    let err = |index: Option<usize>, reason: String| ModelError::Dataset {
        path: path.to_path_buf(),
        index,
        reason,
    };
    let trimmed = text.trim_start_matches('\u{feff}').trim_start();
    let items: Vec<(usize, Value, Option<usize>)> = if trimmed.starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(trimmed)
            .map_err(|e| err(None, format!("not a JSON array of items: {e}")))?;
        v.into_iter()
            .enumerate()
            .map(|(i, v)| (i, v, None))
            .collect()
    } else {
        let mut out = Vec::new();
        for (line_no, line) in trimmed.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let index = out.len();
            let v: Value = serde_json::from_str(line).map_err(|e| {
                err(
                    Some(index),
                    format!("line {}: not a JSON object: {e}", line_no + 1),
                )
            })?;
            out.push((index, v, Some(line_no + 1)));
        }
        out
    };
    if items.is_empty() {
        return Err(err(None, "no training items".into()));
    }
    items
        .into_iter()
        .map(|(i, v, line)| {
            conversation(&v).map_err(|reason| {
                let reason = match line {
                    Some(l) => format!("line {l}: {reason}"),
                    None => reason,
                };
                err(Some(i), reason)
            })
        })
        .collect()
}

fn conversation(v: &Value) -> std::result::Result<Conversation, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("expected a JSON object, found {}", kind(v)))?;
    let text = |key: &str, required: bool| -> std::result::Result<Option<String>, String> {
        match obj.get(key) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(format!("missing \"{key}\"")),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!("\"{key}\" must be a string, found {}", kind(other))),
        }
    };
    let conv = if let Some(turns) = obj.get("conversations").or_else(|| obj.get("messages")) {
        let turns = turns
            .as_array()
            .ok_or_else(|| format!("\"conversations\" must be an array, found {}", kind(turns)))?;
        let mut messages = Vec::with_capacity(turns.len());
        for (n, t) in turns.iter().enumerate() {
            let m = t
                .as_object()
                .ok_or_else(|| format!("turn {n}: expected an object, found {}", kind(t)))?;
            let field = |a: &str, b: &str| -> std::result::Result<String, String> {
                match m.get(a).or_else(|| m.get(b)) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(other) => Err(format!(
                        "turn {n}: \"{a}\" must be a string, found {}",
                        kind(other)
                    )),
                    None => Err(format!("turn {n}: missing \"{a}\" (or \"{b}\")")),
                }
            };
            let role = field("from", "role")?;
            let role = match role.to_ascii_lowercase().as_str() {
                "human" | "user" => Role::User,
                "gpt" | "assistant" | "chatgpt" | "bot" | "model" => Role::Assistant,
                "system" => Role::System,
                _ => {
                    return Err(format!(
                        "turn {n}: unknown role {role:?} (expected human/user, gpt/assistant or system)"
                    ))
                }
            };
            messages.push(Message::new(role, field("value", "content")?));
        }
        Conversation { messages }
    } else if obj.contains_key("instruction") || obj.contains_key("output") {
        let item = AlpacaItem {
            instruction: text("instruction", true)?.unwrap_or_default(),
            input: text("input", false)?.unwrap_or_default(),
            output: text("output", true)?.unwrap_or_default(),
        };
        let mut c = item.to_conversation();
        if let Some(system) = text("system", false)? {
            if !system.is_empty() {
                c.messages.insert(0, Message::new(Role::System, system));
            }
        }
        c
    } else {
        return Err(
            "neither Alpaca (instruction/input/output) nor ShareGPT (conversations) form".into(),
        );
    };
    if !conv.messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("no assistant turn to learn from".into());
    }
    if conv
        .messages
        .iter()
        .any(|m| m.role == Role::Assistant && m.content.trim().is_empty())
    {
        return Err("an assistant turn is empty".into());
    }
    Ok(conv)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One tokenized training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the rendered conversation.
    pub ids: Vec<u32>,
    /// `targets[i]`: token `i` is learned (predicted from tokens `..i`). Never true at 0.
    pub targets: Vec<bool>,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True for no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of learned tokens.
    pub fn num_targets(&self) -> usize {
        self.targets.iter().skip(1).filter(|&&t| t).count()
    }
}

/// Counts from [`encode_conversations`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EncodeStats {
    /// Conversations longer than the limit, cut to it.
    pub truncated: usize,
    /// Conversations left without any learned token after truncation (not trained on).
    pub skipped: usize,
}

/// The chat template of `model`, as `hive-node chat` compiles it.
pub fn model_template(model: &BaseModel) -> Result<ChatTemplate> {
    let tok = &model.tokenizer;
    let name = |id: Option<u32>| {
        id.and_then(|i| tok.decode(&[i], false).ok())
            .unwrap_or_default()
    };
    ChatTemplate::new(
        model.chat_template.as_deref(),
        &name(tok.bos_id()),
        &name(tok.eos_id()),
    )
}

/// Renders and tokenizes one conversation; assistant turns become targets. Each assistant turn's
/// span is found by rendering the conversation up to it with the generation prompt (where chat
/// would start generating) and through it (including the end-of-turn marker), and tokenizing both
/// prefixes.
pub fn encode_conversation(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    conv: &Conversation,
) -> Result<Example> {
    let msgs = &conv.messages;
    let ids = tokenizer.encode(&template.render(msgs, false)?, false)?;
    let mut targets = vec![false; ids.len()];
    for (i, m) in msgs.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let before = tokenizer.encode(&template.render(&msgs[..i], true)?, false)?;
        let through = tokenizer.encode(&template.render(&msgs[..=i], false)?, false)?;
        // The prefixes tokenize as the start of the full text except, rarely, where BPE merges
        // across a turn boundary; the common prefix is the span then.
        let start = common_prefix(&before, &ids).max(1);
        let end = common_prefix(&through, &ids);
        for t in targets.iter_mut().take(end).skip(start) {
            *t = true;
        }
    }
    Ok(Example { ids, targets })
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Encodes every conversation for `model` ([`encode_conversation`]), cutting each to `max_len`
/// tokens and leaving out those with no learned token left. `path` names the file in errors.
pub fn encode_conversations(
    model: &BaseModel,
    path: &Path,
    convs: &[Conversation],
    max_len: usize,
) -> Result<(Vec<Example>, EncodeStats)> {
    if max_len < 2 {
        return Err(ModelError::Training {
            reason: format!("max sequence length {max_len} is too short"),
        });
    }
    let template = model_template(model)?;
    let mut stats = EncodeStats::default();
    let mut out = Vec::with_capacity(convs.len());
    for (i, c) in convs.iter().enumerate() {
        let mut ex = encode_conversation(&model.tokenizer, &template, c).map_err(|e| {
            ModelError::Dataset {
                path: path.to_path_buf(),
                index: Some(i),
                reason: e.to_string(),
            }
        })?;
        if ex.len() > max_len {
            stats.truncated += 1;
            ex.ids.truncate(max_len);
            ex.targets.truncate(max_len);
        }
        if ex.num_targets() == 0 {
            stats.skipped += 1;
            continue;
        }
        out.push(ex);
    }
    Ok((out, stats))
}

/// Batches of example indices for one epoch: a seeded shuffle, then within groups of 16 batches
/// the examples are sorted by length so each batch holds similar lengths, then the batch order is
/// shuffled. Depends only on `(lens, batch_size, seed, epoch)`.
pub fn length_grouped_batches(
    lens: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut idx: Vec<usize> = (0..lens.len()).collect();
    idx.shuffle(&mut rng);
    let mut batches = Vec::with_capacity(lens.len().div_ceil(bs));
    for group in idx.chunks_mut(bs * 16) {
        group.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
        batches.extend(group.chunks(bs).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// The six examples of the legacy tool's sample dataset (Chinese, as it had them): who the
/// assistant is, its features, federated learning, a Python Fibonacci function, LoRA in simple
/// words, staying motivated.
pub fn sample_items() -> Vec<AlpacaItem> {
    let item = |instruction: &str, output: &str| AlpacaItem {
        instruction: instruction.to_string(),
        input: String::new(),
        output: output.to_string(),
    };
    vec![
        item(
            "你是谁？",
            "我是HiveMind智能助手，一个通过去中心化联邦学习不断进化的AI助手。我由社区中的每一位用户共同训练，你的数据始终保留在你自己的设备上。",
        ),
        item(
            "你有什么功能？",
            "我是HiveMind助手，我可以回答问题、解释概念、编写和讲解代码、帮助你学习和思考。因为采用联邦学习，我会在保护隐私的前提下，从大家的贡献中持续进步。",
        ),
        item(
            "什么是联邦学习？",
            "联邦学习是一种分布式机器学习方法：每个参与者在自己的设备上用本地数据训练模型，只把模型更新（例如LoRA适配器）分享出去，再把大家的更新聚合成更好的模型。原始数据从不离开本地，因此能保护隐私。",
        ),
        item(
            "用Python写一个计算斐波那契数列的函数",
            "下面是一个计算斐波那契数列的Python函数：\n\n```python\ndef fibonacci(n):\n    \"\"\"返回前n个斐波那契数\"\"\"\n    result = []\n    a, b = 0, 1\n    for _ in range(n):\n        result.append(a)\n        a, b = b, a + b\n    return result\n\nprint(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]\n```\n\n这个函数用循环迭代计算，时间复杂度是O(n)。",
        ),
        item(
            "请用简单的话解释什么是LoRA",
            "LoRA（低秩适配）是一种高效微调大模型的方法。它不改动原模型的大量参数，而是在部分层旁边加上两个很小的矩阵，只训练这两个小矩阵。这样训练快、占用内存少，得到的适配器文件也很小，方便分享和合并。",
        ),
        item(
            "如何保持学习的动力？",
            "保持学习动力的几个方法：\n1. 设定清晰而具体的小目标，完成后给自己一点奖励；\n2. 把大任务拆成小步骤，每天坚持一点点；\n3. 记录自己的进步，看到成长会更有信心；\n4. 找到学习伙伴，互相鼓励和监督；\n5. 把所学用到实际中，体会知识带来的乐趣。\n记住，坚持比完美更重要！",
        ),
    ]
}
