//! The tiny policy's tokenizer: byte-level BPE trained on the task corpus with the `tokenizers`
//! crate, digits split one per token (as Llama and Qwen do), and the format's tags as atomic
//! added tokens. Saved as `tokenizer.json`, loadable by Hugging Face `tokenizers`.

use crate::task::{episode_close, episode_open, BOXED_OPEN, THINK_CLOSE, THINK_OPEN};
use anyhow::{anyhow, bail, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// End of sequence (also used as beginning of sequence).
pub const EOS: &str = "<|endoftext|>";
pub const PAD: &str = "<|pad|>";

/// Highest episode number with its own tag tokens.
pub const MAX_EPISODE_TAGS: usize = 16;

/// The format's tags, each one token.
pub fn tag_tokens() -> Vec<String> {
    let mut tags = vec![THINK_OPEN.to_string(), THINK_CLOSE.to_string(), BOXED_OPEN.to_string()];
    for k in 1..=MAX_EPISODE_TAGS {
        tags.push(episode_open(k));
        tags.push(episode_close(k));
    }
    tags
}

/// Trains the tokenizer on `corpus` so that it has exactly `vocab_size` entries or fewer.
pub fn train(corpus: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let tags = tag_tokens();
    let bpe_vocab = vocab_size
        .checked_sub(tags.len())
        .filter(|v| *v > 256 + 2)
        .ok_or_else(|| anyhow!("vocab_size {vocab_size} leaves no room for merges"))?;
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(bpe_vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOS, true), AddedToken::from(PAD, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ]))));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Tags are added whole afterwards, so BPE spends no merges on them.
    let strip = |s: &String| tags.iter().fold(s.clone(), |acc, t| acc.replace(t.as_str(), " "));
    let stripped: Vec<String> = corpus.iter().map(strip).collect();
    tokenizer.train(&mut trainer, stripped.iter()).map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    let tag_tokens: Vec<AddedToken> = tags.iter().map(|t| AddedToken::from(t.clone(), false)).collect();
    tokenizer.add_tokens(&tag_tokens);
    let size = tokenizer.get_vocab_size(true);
    if size > vocab_size {
        bail!("tokenizer has {size} entries, more than vocab_size {vocab_size}");
    }
    Ok(tokenizer)
}

/// Token ids of `text`, with no special tokens added.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids().to_vec())
}

/// The text of each token of a response, special tokens (end of sequence) as "". The pieces
/// concatenate to the decoded response, which is what makes them usable as character offsets; a
/// tokenizer whose single tokens do not decode independently (a character split across byte
/// tokens) falls back to differences of decoded prefixes.
pub fn decode_pieces(tokenizer: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"));
    let pieces: Vec<String> = ids.iter().map(|&id| decode(&[id])).collect::<Result<_>>()?;
    let whole = decode(ids)?;
    if pieces.concat() == whole {
        return Ok(pieces);
    }
    // Each token gets the part of the whole text that its prefix newly and completely decodes; a
    // token ending inside a character gets "" and the token that completes it gets the character.
    let mut out = Vec::with_capacity(ids.len());
    let mut emitted = 0;
    for t in 1..=ids.len() {
        let prefix = decode(&ids[..t])?;
        let common: usize = prefix.chars().zip(whole.chars()).take_while(|(a, b)| a == b).map(|(c, _)| c.len_utf8()).sum();
        let end = if t == ids.len() { whole.len() } else { common.max(emitted) };
        out.push(whole[emitted..end].to_string());
        emitted = end;
    }
    Ok(out)
}

/// Id of a token the policy needs, with a clear error when the tokenizer lacks it.
pub fn required_id(tokenizer: &Tokenizer, token: &str) -> Result<u32> {
    tokenizer.token_to_id(token).ok_or_else(|| anyhow!("tokenizer has no {token:?} token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let cfg = crate::config::TaskConfig { n_train: 200, n_eval: 10, ..Default::default() };
        let train = crate::task::generate(&cfg, 0).unwrap().train;
        train.iter().map(|r| format!("{}{}", r.prompt, r.solution.as_ref().unwrap())).collect()
    }

    #[test]
    fn trained_tokenizer_round_trips_and_keeps_tags_whole() {
        let corpus = corpus();
        let tok = train(&corpus, 512).unwrap();
        assert!(tok.get_vocab_size(true) <= 512);
        let text = &corpus[0];
        let ids = encode(&tok, text).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), *text);
        let pieces = decode_pieces(&tok, &ids).unwrap();
        assert_eq!(pieces.concat(), *text);
        for tag in ["<think>", "</think>", "<episode_1>", "</episode_1>", "\\boxed{"] {
            assert_eq!(encode(&tok, tag).unwrap().len(), 1, "{tag}");
        }
        // A character split across byte tokens: pieces still concatenate to the text.
        let ids = encode(&tok, "x\u{10f8c8}y").unwrap();
        let pieces = decode_pieces(&tok, &ids).unwrap();
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
        assert_eq!(pieces.len(), ids.len());
        let ids = [ids[0], ids[1]]; // "x" and the first byte of the character alone
        assert_eq!(decode_pieces(&tok, &ids).unwrap().concat(), tok.decode(&ids, true).unwrap());
        // Digits are one token each.
        assert_eq!(encode(&tok, "123").unwrap().len(), 3);
    }

    #[test]
    fn training_is_deterministic() {
        let corpus = corpus();
        let a = train(&corpus, 400).unwrap().to_string(false).unwrap();
        let b = train(&corpus, 400).unwrap().to_string(false).unwrap();
        assert_eq!(a, b);
    }
}
