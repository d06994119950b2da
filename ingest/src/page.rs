//! The vote page for the default poll, like the original app's: the options, the voter's current
//! choice, and a note that the vote can be changed. No external assets.

use model::Poll;

pub fn render(poll: &Poll, choice: Option<&str>) -> String {
    let mut buttons = String::new();
    for o in &poll.options {
        let chosen = if choice == Some(o.as_str()) {
            " chosen"
        } else {
            ""
        };
        // Option ids are [A-Za-z0-9_-] (validated in the model), so they need no escaping.
        buttons.push_str(&format!(
            "<button class=\"option{chosen}\" type=\"submit\" name=\"vote\" value=\"{o}\">{o}</button>\n"
        ));
    }
    let status = match choice {
        Some(c) => format!("<p id=\"choice\">Your vote: <b>{c}</b>. You can change your vote.</p>"),
        None => {
            "<p id=\"choice\">You have not voted yet. You can change your vote at any time.</p>"
                .to_string()
        }
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Tally: vote</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 32rem; margin: 3rem auto; text-align: center; }}
button.option {{ font-size: 1.5rem; margin: .5rem; padding: 1rem 2rem; border-radius: .5rem; border: 2px solid #335; background: #fff; cursor: pointer; }}
button.chosen {{ background: #335; color: #fff; }}
</style></head>
<body>
<h1>Poll: {poll}</h1>
<form method="post" action="/">
{buttons}</form>
{status}
</body></html>
"#,
        poll = poll.id
    )
}
