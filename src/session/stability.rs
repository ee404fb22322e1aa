//! The stable prefix of a sentence's partials: the part of a guess that two consecutive guesses
//! agree on, which a client can show as settled while the rest may still change.
//!
//! This is the "local agreement" policy of streaming Whisper (Macháček et al., 2023,
//! whisper_streaming's `LocalAgreement-2`): a prefix is confirmed once two consecutive
//! hypotheses of the same audio share it. Cloud APIs give the same split in their own terms
//! (AWS Transcribe's per-item `Stable`, Google's `stability`, Tencent's per-word `stable_flag`);
//! voxpoll computes it in the session engine, so it holds for every provider alike.
//!
//! The prefix ends on a character boundary for scripts written without spaces (Chinese,
//! Japanese) and on a word boundary otherwise, so "the cat" / "the catalog" agree on "the ",
//! not on half a word. Every stable prefix is a prefix of the guess before it, so it only grows
//! while the guesses keep to it; a guess that contradicts it shortens it (the benchmark counts
//! how often: `scripts/bench`, "stable erasure").

/// Per-stream agreement state: the newest partial of the open sentence.
#[derive(Debug, Default)]
pub(super) struct Agreement {
    /// (sentence, its newest partial's text).
    open: Option<(u32, String)>,
}

impl Agreement {
    /// A partial of `sentence` with `text` arrived: its stable prefix (a prefix of `text`,
    /// possibly empty). The first partial of a sentence has nothing to agree with: "".
    pub fn partial(&mut self, sentence: u32, text: &str) -> String {
        let stable = match &self.open {
            Some((s, prev)) if *s == sentence => {
                text[..word_boundary(text, common_prefix(prev, text))].to_string()
            }
            _ => String::new(),
        };
        self.open = Some((sentence, text.to_string()));
        stable
    }

    /// `sentence` has its final: the next partial starts a new agreement.
    pub fn finalised(&mut self, sentence: u32) {
        if self.open.as_ref().is_some_and(|(s, _)| *s <= sentence) {
            self.open = None;
        }
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((i, _), _)| i)
}

/// `len` (a char boundary of `text`) moved back so it does not split a word of a script that
/// separates words with spaces: a cut between two such letters backs off to the last character
/// that is not one.
fn word_boundary(text: &str, len: usize) -> usize {
    let (head, tail) = text.split_at(len);
    let splits = |a: Option<char>, b: Option<char>| matches!((a, b), (Some(a), Some(b)) if spaced_letter(a) && spaced_letter(b));
    if !splits(head.chars().next_back(), tail.chars().next()) {
        return len;
    }
    head.char_indices()
        .rev()
        .find(|&(_, c)| !spaced_letter(c))
        .map_or(0, |(i, c)| i + c.len_utf8())
}

/// A letter or digit of a script whose words are separated by spaces (Latin, Cyrillic, Hangul
/// ...), as opposed to CJK ideographs and kana, where every character stands alone.
fn spaced_letter(c: char) -> bool {
    let unspaced = matches!(c as u32,
        0x3040..=0x30FF // hiragana, katakana
        | 0x3400..=0x4DBF // CJK extension A
        | 0x4E00..=0x9FFF // CJK unified ideographs
        | 0xF900..=0xFAFF // CJK compatibility ideographs
        | 0x20000..=0x3FFFF); // CJK extensions B and later
    c.is_alphanumeric() && !unspaced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_guesses_agree_on_their_common_prefix() {
        let mut a = Agreement::default();
        assert_eq!(a.partial(0, "今天天"), "");
        assert_eq!(a.partial(0, "今天天气很"), "今天天");
        assert_eq!(a.partial(0, "今天天气很好，"), "今天天气很");
        // Whisper rewrites its tail: the agreement stops where the guesses part.
        assert_eq!(a.partial(0, "今天天气很好。我们"), "今天天气很好");
    }

    #[test]
    fn words_of_spaced_scripts_are_not_split() {
        let mut a = Agreement::default();
        a.partial(0, "the cat");
        assert_eq!(a.partial(0, "the catalog is"), "the ");
        assert_eq!(a.partial(0, "the catalog is here"), "the catalog is");
        assert_eq!(word_boundary("abc", 2), 0);
        assert_eq!(
            word_boundary("héllo wörld", "héllo wö".len()),
            "héllo ".len()
        );
    }

    #[test]
    fn a_guess_that_contradicts_the_stable_prefix_shortens_it() {
        let mut a = Agreement::default();
        a.partial(0, "一二三四");
        assert_eq!(a.partial(0, "一二三四五"), "一二三四");
        assert_eq!(a.partial(0, "一二三四六"), "一二三四");
        assert_eq!(a.partial(0, "一二山"), "一二");
        // A word that grows is no longer the word that was agreed on.
        a.partial(3, "the cat");
        assert_eq!(a.partial(3, "the cat"), "the cat");
        assert_eq!(a.partial(3, "the cats"), "the ");
    }

    #[test]
    fn a_new_sentence_or_a_final_starts_over() {
        let mut a = Agreement::default();
        a.partial(0, "你好");
        assert_eq!(a.partial(0, "你好吗"), "你好");
        assert_eq!(a.partial(1, "再见"), "");
        assert_eq!(a.partial(1, "再见了"), "再见");
        a.finalised(1);
        assert_eq!(a.partial(2, "再见了"), "");
        // A late final of an earlier sentence leaves the open one alone.
        assert_eq!(a.partial(2, "再见了吧"), "再见了");
        a.finalised(1);
        assert_eq!(a.partial(2, "再见了吧。"), "再见了吧");
    }
}
