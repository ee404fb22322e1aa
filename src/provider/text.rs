//! The text options cloud ASR applies to its results, for providers whose upstream does not:
//! Tencent real-time ASR's `filter_punc`, `filter_modal` and `convert_num_mode`
//! (cloud.tencent.com/document/product/1093/48982, request parameters; shared/providers.md
//! §1.2). Tencent applies them upstream; the embedded engine and the VAD-segmented
//! OpenAI-compatible provider apply them here, to partials and finals alike. An option left
//! unset leaves the text as the engine wrote it.
//!
//! The rules, documented in README ("Text options"):
//! - `filter_punc` 1 drops a sentence-final full stop (`。`, `.`, `．`); 2 drops every
//!   punctuation mark (an apostrophe or hyphen inside a word stays), as Tencent's REST API.
//! - `filter_modal` (Mandarin) 1 drops hesitation fillers: runs of 嗯 呃 唔 anywhere, and a
//!   clause made only of 啊 哦 噢 额 诶 欸 嗯 呃 唔 (with its comma); 2 also drops a modal
//!   particle (啊 呀 吧 呢 嘛 啦 哈 呗 嘞 哇 哦) that ends a clause.
//! - `convert_num_mode` (Mandarin) 0 writes Arabic numbers in Chinese numerals (up to 8 digits
//!   as a number, `2026` → 二千零二十六; longer runs or a leading zero digit by digit; `3.5` →
//!   三点五; `50%` → 百分之五十); 1 writes Chinese numerals as Arabic where that is a number and
//!   not a word: a run of two or more numeral characters (三百二十 → 320, 二零二六 → 2026,
//!   三点五 → 3.5, 百分之五十 → 50%), never a lone character (一起, 三个, 十分) nor an idiom
//!   (万一, 千万, 一一); 3 also writes arithmetic: a lone numeral beside 加 减 乘以 除以 等于,
//!   and those words as `+ - × ÷ =` between two numbers.

use super::StreamOptions;
use chinese_number::{ChineseCase, ChineseVariant};

/// The text options of one stream; all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TextOptions {
    /// Tencent `filter_punc`: 0 keep, 1 drop the final full stop, 2 drop all punctuation.
    pub filter_punc: u8,
    /// Tencent `filter_modal`: 0 keep, 1 fillers, 2 fillers and clause-final particles.
    pub filter_modal: u8,
    /// Tencent `convert_num_mode`: `None` leaves numbers as written; 0 Chinese numerals, 1
    /// Arabic, 3 Arabic with arithmetic.
    pub convert_num_mode: Option<u8>,
}

impl TextOptions {
    /// The options a stream was opened with.
    pub fn of(opts: &StreamOptions) -> Self {
        Self {
            filter_punc: opts.filter_punc.unwrap_or(0),
            filter_modal: opts.filter_modal.unwrap_or(0),
            convert_num_mode: opts.convert_num_mode,
        }
    }

    /// True when [`TextOptions::apply`] changes nothing.
    pub fn is_identity(&self) -> bool {
        *self == Self::default()
    }

    /// `text` (in Whisper language `lang`: `zh`, `en`, ...) with the options applied. The
    /// Mandarin-only options leave other languages alone, as Tencent's do.
    pub fn apply(&self, text: &str, lang: &str) -> String {
        let zh = lang == "zh";
        let mut out = text.to_string();
        if zh && self.filter_modal > 0 {
            out = filter_modal(&out, self.filter_modal >= 2);
        }
        if zh {
            match self.convert_num_mode {
                Some(0) => out = to_chinese_numerals(&out),
                Some(m @ (1 | 3)) => out = to_arabic_numerals(&out, m == 3),
                _ => {}
            }
        }
        match self.filter_punc {
            1 => out = drop_final_stop(&out),
            2 => out = drop_punctuation(&out),
            _ => {}
        }
        out
    }
}

fn is_punct(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(
            c,
            '。' | '，'
                | '、'
                | '；'
                | '：'
                | '？'
                | '！'
                | '“'
                | '”'
                | '‘'
                | '’'
                | '（'
                | '）'
                | '《'
                | '》'
                | '【'
                | '】'
                | '「'
                | '」'
                | '『'
                | '』'
                | '…'
                | '—'
                | '·'
                | '～'
                | '．'
        )
}

fn drop_final_stop(text: &str) -> String {
    text.trim_end()
        .trim_end_matches(['。', '.', '．'])
        .trim_end()
        .to_string()
}

fn drop_punctuation(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let inside_word = matches!(c, '\'' | '’' | '-')
            && i > 0
            && chars[i - 1].is_alphanumeric()
            && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
        if !is_punct(c) || inside_word {
            out.push(c);
        } else if chars.get(i + 1).is_some_and(|n| n.is_ascii_alphanumeric())
            && i > 0
            && chars[i - 1].is_ascii_alphanumeric()
        {
            // "yes,no" → "yes no", not "yesno".
            out.push(' ');
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Hesitation sounds that are never content.
const FILLERS: [char; 3] = ['嗯', '呃', '唔'];
/// Interjections that are fillers when they make up a whole clause.
const INTERJECTIONS: [char; 9] = ['啊', '哦', '噢', '额', '诶', '欸', '嗯', '呃', '唔'];
/// Modal particles that end a clause.
const PARTICLES: [char; 11] = [
    '啊', '呀', '吧', '呢', '嘛', '啦', '哈', '呗', '嘞', '哇', '哦',
];

fn filter_modal(text: &str, strict: bool) -> String {
    // Clauses end at punctuation; each keeps its punctuation.
    let mut out = String::with_capacity(text.len());
    let mut clause = String::new();
    let flush = |clause: &mut String, punct: Option<char>, out: &mut String| {
        let mut words: Vec<char> = clause.chars().filter(|c| !FILLERS.contains(c)).collect();
        let only_interjections = !clause.trim().is_empty()
            && clause
                .chars()
                .all(|c| INTERJECTIONS.contains(&c) || c.is_whitespace());
        if only_interjections {
            words.clear();
        } else if strict {
            while words.len() > 1 && words.last().is_some_and(|c| PARTICLES.contains(c)) {
                words.pop();
            }
        }
        let kept: String = words.into_iter().collect();
        if kept.trim().is_empty() {
            // A filler clause goes with its comma; a sentence end stays if text came before.
            if let Some(p) = punct.filter(|p| !matches!(p, '，' | ',' | '、') && !out.is_empty())
            {
                // "他说，嗯。" → "他说。": the sentence's end replaces the comma before it.
                if out.ends_with(['，', ',', '、']) {
                    out.pop();
                }
                out.push(p);
            }
        } else {
            out.push_str(&kept);
            out.extend(punct);
        }
        clause.clear();
    };
    for c in text.chars() {
        if is_punct(c) {
            flush(&mut clause, Some(c), &mut out);
        } else {
            clause.push(c);
        }
    }
    flush(&mut clause, None, &mut out);
    // A sentence end that followed a dropped clause may now follow another mark.
    let mut cleaned = String::with_capacity(out.len());
    for c in out.chars() {
        let last_is_mark = cleaned.chars().last().is_some_and(is_punct);
        if !(is_punct(c) && last_is_mark && matches!(c, '。' | '！' | '？')) {
            cleaned.push(c);
        }
    }
    cleaned.trim().to_string()
}

const DIGITS: &str = "零〇一二两三四五六七八九";
const UNITS: &str = "十百千万亿";
/// Runs of numerals that are words, not numbers.
const IDIOMS: [&str; 6] = ["万一", "千万", "一一", "万万", "千千万万", "一五一十"];

fn numeral(c: char) -> bool {
    DIGITS.contains(c) || UNITS.contains(c)
}

fn digit_value(c: char) -> Option<u64> {
    Some(match c {
        '零' | '〇' => 0,
        '一' => 1,
        '二' | '两' => 2,
        '三' => 3,
        '四' => 4,
        '五' => 5,
        '六' => 6,
        '七' => 7,
        '八' => 8,
        '九' => 9,
        _ => return None,
    })
}

/// The Arabic form of a run of numeral characters: a number with units (三百二十 → 320) or a
/// digit string (二零二六 → 2026); `None` when it is neither.
fn run_to_arabic(run: &str) -> Option<String> {
    if run.chars().any(|c| UNITS.contains(c)) {
        let normal = run.replace('两', "二").replace('〇', "零");
        chinese_number::from_chinese_to_u64_ten_thousand(&normal)
            .ok()
            .map(|n| n.to_string())
    } else {
        run.chars()
            .map(|c| digit_value(c).map(|d| char::from(b'0' + d as u8)))
            .collect()
    }
}

/// Arithmetic words and their symbols (mode 3).
const OPERATORS: [(&str, &str); 5] = [
    ("乘以", "×"),
    ("除以", "÷"),
    ("等于", "="),
    ("加", "+"),
    ("减", "-"),
];

fn to_arabic_numerals(text: &str, math: bool) -> String {
    enum Tok {
        Num(String, String),
        Op(&'static str, &'static str),
        Text(char),
    }
    // Tokens: numeral runs (with 点 decimals and a 百分之 prefix), operators, other chars.
    let chars: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let rest: String = chars[i..].iter().take(3).collect();
        let percent = rest == "百分之" && chars.get(i + 3).copied().is_some_and(numeral);
        let start = if percent { i + 3 } else { i };
        if chars.get(start).copied().is_some_and(numeral) {
            let mut j = start;
            while j < chars.len()
                && (numeral(chars[j])
                    || (chars[j] == '点'
                        && j > start
                        && chars
                            .get(j + 1)
                            .copied()
                            .is_some_and(|c| digit_value(c).is_some())))
            {
                j += 1;
            }
            let src: String = chars[i..j].iter().collect();
            toks.push(Tok::Num(src, chars[start..j].iter().collect()));
            i = j;
            continue;
        }
        if let Some(&(word, sym)) = OPERATORS.iter().find(|(w, _)| rest.starts_with(w) && math) {
            toks.push(Tok::Op(word, sym));
            i += word.chars().count();
            continue;
        }
        toks.push(Tok::Text(chars[i]));
        i += 1;
    }
    let convert = |src: &str, run: &str, lone_ok: bool| -> Option<String> {
        let percent = src.starts_with("百分之");
        if IDIOMS.contains(&run) || (run.chars().count() < 2 && !lone_ok && !percent) {
            return None;
        }
        let value = match run.split_once('点') {
            Some((int, frac)) => format!("{}.{}", run_to_arabic(int)?, run_to_arabic(frac)?),
            None => run_to_arabic(run)?,
        };
        Some(if percent { format!("{value}%") } else { value })
    };
    let mut out = String::with_capacity(text.len());
    for (k, t) in toks.iter().enumerate() {
        let beside_op = |k: Option<usize>| {
            k.and_then(|k| toks.get(k))
                .is_some_and(|t| matches!(t, Tok::Op(..)))
        };
        let beside_num = |k: Option<usize>| {
            k.and_then(|k| toks.get(k))
                .is_some_and(|t| matches!(t, Tok::Num(..)))
        };
        match t {
            Tok::Num(src, run) => {
                // A day after a month, a month after a year: 十二月六日 → 12月6日.
                let after_date = k >= 2
                    && matches!(toks[k - 1], Tok::Text('年' | '月'))
                    && matches!(&toks[k - 2], Tok::Num(src, r) if convert(src, r, true).is_some());
                let lone_ok = after_date || beside_op(k.checked_sub(1)) || beside_op(Some(k + 1));
                match convert(src, run, lone_ok) {
                    Some(v) => out.push_str(&v),
                    None => out.push_str(src),
                }
            }
            Tok::Op(word, sym) => {
                if beside_num(k.checked_sub(1)) && beside_num(Some(k + 1)) {
                    out.push_str(sym);
                } else {
                    out.push_str(word);
                }
            }
            Tok::Text(c) => out.push(*c),
        }
    }
    out
}

fn to_chinese_numerals(text: &str) -> String {
    let digit = |c: char| {
        DIGITS
            .chars()
            .filter(|&d| d != '〇' && d != '两')
            .nth(c as usize - '0' as usize)
    };
    let number = |run: &str| -> String {
        match run.parse::<u64>() {
            Ok(n) if run.len() <= 8 && (run.len() == 1 || !run.starts_with('0')) => {
                chinese_number::from_u64_to_chinese_ten_thousand(
                    ChineseVariant::Simple,
                    ChineseCase::Lower,
                    n,
                )
            }
            _ => run.chars().filter_map(digit).collect(),
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j].is_ascii_digit() {
            j += 1;
        }
        let int: String = chars[i..j].iter().collect();
        let mut spoken = number(&int);
        if chars.get(j) == Some(&'.') && chars.get(j + 1).is_some_and(char::is_ascii_digit) {
            let mut k = j + 1;
            while k < chars.len() && chars[k].is_ascii_digit() {
                k += 1;
            }
            spoken.push('点');
            spoken.extend(chars[j + 1..k].iter().copied().filter_map(digit));
            j = k;
        }
        if matches!(chars.get(j), Some('%' | '％')) {
            spoken = format!("百分之{spoken}");
            j += 1;
        }
        out.push_str(&spoken);
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(filter_punc: u8, filter_modal: u8, convert_num_mode: Option<u8>) -> TextOptions {
        TextOptions {
            filter_punc,
            filter_modal,
            convert_num_mode,
        }
    }

    #[test]
    fn unset_options_change_nothing() {
        let t = "嗯，我要三百二十个。Hello, world.";
        assert!(TextOptions::default().is_identity());
        assert_eq!(TextOptions::default().apply(t, "zh"), t);
    }

    #[test]
    fn filter_punc_drops_the_final_stop_or_every_mark() {
        assert_eq!(
            opts(1, 0, None).apply("今天天气很好。", "zh"),
            "今天天气很好"
        );
        assert_eq!(opts(1, 0, None).apply("真的吗？", "zh"), "真的吗？");
        assert_eq!(opts(1, 0, None).apply("It is late.", "en"), "It is late");
        assert_eq!(
            opts(2, 0, None).apply("你好，世界！“测试”。", "zh"),
            "你好世界测试"
        );
        assert_eq!(
            opts(2, 0, None).apply("Don't stop, well-known man.", "en"),
            "Don't stop well-known man"
        );
        assert_eq!(opts(2, 0, None).apply("yes,no", "en"), "yes no");
    }

    #[test]
    fn filter_modal_drops_fillers_then_clause_final_particles() {
        let partial = opts(0, 1, None);
        assert_eq!(partial.apply("嗯，我想去北京。", "zh"), "我想去北京。");
        assert_eq!(partial.apply("呃呃我想去北京吧。", "zh"), "我想去北京吧。");
        assert_eq!(partial.apply("啊，好的。", "zh"), "好的。");
        assert_eq!(partial.apply("额度不够。", "zh"), "额度不够。");
        assert_eq!(partial.apply("他说，嗯。", "zh"), "他说。");
        let strict = opts(0, 2, None);
        assert_eq!(strict.apply("我们走吧。好啊！", "zh"), "我们走。好！");
        assert_eq!(strict.apply("是吗？", "zh"), "是吗？");
        assert_eq!(strict.apply("吧。", "zh"), "吧。");
        // Mandarin only.
        assert_eq!(strict.apply("uh, okay", "en"), "uh, okay");
    }

    #[test]
    fn convert_num_mode_1_writes_numbers_not_words_in_arabic() {
        let smart = opts(0, 0, Some(1));
        assert_eq!(smart.apply("我要三百二十个。", "zh"), "我要320个。");
        assert_eq!(smart.apply("二零二六年十二月六日", "zh"), "2026年12月6日");
        assert_eq!(smart.apply("增长了百分之五十", "zh"), "增长了50%");
        assert_eq!(smart.apply("三点五公斤", "zh"), "3.5公斤");
        assert_eq!(smart.apply("两万三千", "zh"), "23000");
        for word in [
            "我们一起去",
            "三个人",
            "十分好",
            "万一下雨",
            "千万别去",
            "一一说明",
            "三点钟",
        ] {
            assert_eq!(smart.apply(word, "zh"), word);
        }
        // Mode 3: arithmetic.
        let math = opts(0, 0, Some(3));
        assert_eq!(math.apply("三加五等于八", "zh"), "3+5=8");
        assert_eq!(math.apply("十二乘以三等于三十六", "zh"), "12×3=36");
        assert_eq!(math.apply("加油", "zh"), "加油");
        assert_eq!(smart.apply("三加五等于八", "zh"), "三加五等于八");
    }

    #[test]
    fn convert_num_mode_0_writes_chinese_numerals() {
        let spoken = opts(0, 0, Some(0));
        assert_eq!(spoken.apply("我要320个", "zh"), "我要三百二十个");
        assert_eq!(spoken.apply("增长了50%", "zh"), "增长了百分之五十");
        assert_eq!(spoken.apply("3.5公斤", "zh"), "三点五公斤");
        assert_eq!(
            spoken.apply("电话13800138000", "zh"),
            "电话一三八零零一三八零零零"
        );
        assert_eq!(spoken.apply("编号007", "zh"), "编号零零七");
        assert_eq!(spoken.apply("room 320", "en"), "room 320");
    }

    #[test]
    fn options_combine() {
        let all = opts(1, 2, Some(1));
        assert_eq!(all.apply("嗯，我要买三百二十斤吧。", "zh"), "我要买320斤");
    }
}
