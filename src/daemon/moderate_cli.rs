//! `mistguard moderate --text ...`: asks the moderation API once, with the settings `serve` would
//! use, and prints the raw categories next to the hits the category table maps them to. For
//! operators checking their key and their mapping.

use super::config::Config;
use super::ServeArgs;
use crate::io::moderation::{Moderator, Request};
use crate::moderation::{to_hits, ModerationResponse};
use std::io::Read;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ModerateArgs {
    /// The text to moderate (`-` reads standard input).
    #[arg(long, value_name = "TEXT")]
    pub text: String,
    /// Send it to POST /v1/chat/moderations as one user message (else POST /v1/moderations).
    #[arg(long)]
    pub chat: bool,
    /// With --chat: the message's role.
    #[arg(long, value_name = "ROLE", default_value = "user")]
    pub role: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Every `serve` setting (--config, --moderation-url, --moderation-model,
    /// --moderation-categories, ...); keys come from MISTRAL_API_KEY, MISTRAL_API_KEYS or
    /// --moderation-keys-file, as for `serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Exit 0 when the API answered, 1 when it did not (the failure's kind on stderr), 64 on bad
/// configuration or input.
pub fn moderate_main(args: ModerateArgs) -> ExitCode {
    let bad = |m: String| {
        eprintln!("mistguard moderate: {m}");
        ExitCode::from(super::EXIT_CONFIG)
    };
    let config = match args.serve.load() {
        Ok(c) => c,
        Err(e) => return bad(format!("configuration: {e}")),
    };
    let text = if args.text == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            return bad(format!("standard input: {e}"));
        }
        s
    } else {
        args.text.clone()
    };
    if text.is_empty() {
        return bad("the text is empty".into());
    }
    let engine = match crate::load::engine(config.rulesets.as_deref(), &config.models) {
        Ok(e) => e,
        Err(e) => return bad(format!("rulesets: {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return bad(format!("runtime: {e}")),
    };
    let answer = runtime.block_on(async {
        let client = Moderator::new(config.moderation.client.clone())?;
        let req = if args.chat {
            Request::Chat(vec![vec![(args.role.clone(), text.clone())]])
        } else {
            Request::Texts(vec![text.clone()])
        };
        client.send(req).await.map_err(|f| f.to_string())
    });
    match answer {
        Ok(r) => {
            let out = render(&config, &engine, &r, text.len() as u64, args.json);
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mistguard moderate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The answer as a table (or JSON): every category the model returned, its score and flag, the
/// table's line for it and whether it hit; then the mapped hits with their actions.
fn render(
    config: &Config,
    engine: &crate::Engine,
    r: &ModerationResponse,
    len: u64,
    json: bool,
) -> String {
    let mapping = &config.moderation.mapping;
    let Some(result) = r.results.first() else {
        return String::new();
    };
    let remote = mapping.hits(result);
    let hits = to_hits(&remote, engine.ruleset(), 0, len);
    if json {
        let categories: Vec<serde_json::Value> = result
            .category_scores
            .iter()
            .map(|(name, score)| {
                let line = mapping.get(name);
                serde_json::json!({
                    "category": name,
                    "score": score,
                    "flagged_by_api": result.categories.get(name).copied(),
                    "maps_to": line.map(|l| l.rule_id()),
                    "threshold": line.map(|l| l.threshold),
                    "hit": remote.iter().any(|h| &h.category == name),
                })
            })
            .collect();
        let hits: Vec<serde_json::Value> = hits
            .iter()
            .map(|h| {
                serde_json::json!({
                    "rule_id": &*h.rule_id,
                    "trigger_id": &*h.trigger_id,
                    "score": h.score,
                    "action": h.action.as_str(),
                })
            })
            .collect();
        let v = serde_json::json!({
            "model": r.model,
            "id": r.id,
            "categories": categories,
            "hits": hits,
        });
        return format!("{v:#}\n");
    }
    let mut out = format!("model: {}\n\n", r.model);
    out.push_str(&format!(
        "{:<34} {:>6} {:>5}  {:<16} {:>9}  {}\n",
        "CATEGORY", "SCORE", "API", "MAPS TO", "THRESHOLD", "HIT"
    ));
    for (name, score) in &result.category_scores {
        let line = mapping.get(name);
        let api = match result.categories.get(name) {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        out.push_str(&format!(
            "{:<34} {:>6.3} {:>5}  {:<16} {:>9}  {}\n",
            name,
            score,
            api,
            line.map_or("-", |l| l.rule_id()),
            line.map_or_else(|| "-".to_string(), |l| format!("{:.2}", l.threshold)),
            if remote.iter().any(|h| &h.category == name) {
                "HIT"
            } else {
                ""
            }
        ));
    }
    out.push('\n');
    if hits.is_empty() {
        out.push_str("no mapped hit: the verdict would be the local one\n");
    } else {
        out.push_str("mapped hits:\n");
        for h in &hits {
            out.push_str(&format!(
                "  {} {} (score {:.3}) -> {}\n",
                h.rule_id,
                h.trigger_id,
                h.score,
                h.action.as_str()
            ));
        }
        let action = hits.iter().map(|h| h.action).max().unwrap_or_default();
        out.push_str(&format!("verdict at least: {}\n", action.as_str()));
    }
    out
}
