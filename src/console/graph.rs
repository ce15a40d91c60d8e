//! A saga definition drawn as SVG, laid out on the server: one column per depth in the graph
//! (a step sits one column right of the latest step it waits for), parallel branches stacked in
//! their column, each step coloured by its live state when there is one.

use maud::{Markup, html};

/// One step as the drawing needs it.
pub struct Node<'a> {
    pub name: &'a str,
    pub participant: &'a str,
    /// The step's state in a saga (`None` when drawing a definition).
    pub state: Option<&'a str>,
    pub after: &'a [String],
    pub pivot: bool,
    /// The step's `when` condition, if it has one.
    pub when: Option<&'a str>,
}

const COL: i64 = 215;
const ROW: i64 = 68;
const W: i64 = 185;
const H: i64 = 50;
const PAD: i64 = 16;
const MAX_LABEL: usize = 24;

fn label(text: &str) -> String {
    if text.chars().count() <= MAX_LABEL {
        text.to_string()
    } else {
        let cut: String = text.chars().take(MAX_LABEL - 1).collect();
        format!("{cut}…")
    }
}

/// The drawing: positions first, then edges under the boxes.
pub fn svg(nodes: &[Node<'_>]) -> Markup {
    let depth = crate::proto::graph::depths(nodes.iter().map(|n| (n.name, n.after)));
    let mut rows_used: Vec<i64> = Vec::new();
    let mut pos = Vec::with_capacity(nodes.len());
    for d in &depth {
        if rows_used.len() <= *d {
            rows_used.resize(d + 1, 0);
        }
        let row = rows_used.get(*d).copied().unwrap_or(0);
        if let Some(r) = rows_used.get_mut(*d) {
            *r += 1;
        }
        pos.push((PAD + *d as i64 * COL, PAD + row * ROW));
    }
    let columns = rows_used.len().max(1) as i64;
    let rows = rows_used.iter().copied().max().unwrap_or(1).max(1);
    let width = PAD * 2 + (columns - 1) * COL + W;
    let height = PAD * 2 + (rows - 1) * ROW + H;
    let at = |name: &str| {
        nodes
            .iter()
            .position(|n| n.name == name)
            .and_then(|i| pos.get(i).copied())
    };
    html! {
        svg class="graph" xmlns="http://www.w3.org/2000/svg" width=(width) height=(height)
            viewBox={"0 0 " (width) " " (height)} role="img" aria-label="saga graph" {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead" {}
                }
            }
            @for (n, (x, y)) in nodes.iter().zip(&pos) {
                @for parent in n.after {
                    @if let Some((px, py)) = at(parent) {
                        @let (x1, y1, x2, y2) = (px + W, py + H / 2, *x, y + H / 2);
                        @let mid = (x1 + x2) / 2;
                        path class="edge" marker-end="url(#arrow)"
                            d={"M " (x1) " " (y1) " C " (mid) " " (y1) ", " (mid) " " (y2) ", " (x2) " " (y2)} {}
                    }
                }
            }
            @for (n, (x, y)) in nodes.iter().zip(&pos) {
                @let state = n.state.unwrap_or("definition");
                g class={"node state-" (state) @if n.pivot {" pivot"} @if n.when.is_some() {" conditional"}}
                    data-step=(n.name) data-state=(state) {
                    title {
                        (n.name) " (" (n.participant) ")"
                        @if let Some(s) = n.state { ": " (s) }
                        @if n.pivot { " — pivot: after it the saga only goes forward" }
                        @if let Some(w) = n.when { " — when " (w) }
                    }
                    rect x=(x) y=(y) width=(W) height=(H) rx="6" {}
                    text x=(x + 10) y=(y + 20) class="name" { (label(n.name)) }
                    text x=(x + 10) y=(y + 38) class="sub" {
                        (label(n.participant))
                        @if let Some(s) = n.state { " · " (s) }
                        @if n.pivot { " · pivot" }
                        @if n.when.is_some() { " · if" }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(name: &'a str, after: &'a [String]) -> Node<'a> {
        Node {
            name,
            participant: "p",
            state: Some("pending"),
            after,
            pivot: false,
            when: None,
        }
    }

    #[test]
    fn branches_share_a_column_and_the_join_sits_after_both() {
        let root: Vec<String> = vec![];
        let after_a = vec!["a".to_string()];
        let join = vec!["b".to_string(), "c".to_string()];
        let nodes = [
            node("a", &root),
            node("b", &after_a),
            node("c", &after_a),
            node("d", &join),
        ];
        let drawn = svg(&nodes).into_string();
        assert_eq!(drawn.matches("class=\"edge\"").count(), 4);
        assert_eq!(drawn.matches("<rect").count(), 4);
    }

    #[test]
    fn names_are_escaped_and_a_cycle_or_unknown_edge_still_draws() {
        let to_b = vec!["b".to_string(), "ghost".to_string()];
        let to_a = vec!["<script>a".to_string()];
        let nodes = [node("<script>a", &to_b), node("b", &to_a)];
        let drawn = svg(&nodes).into_string();
        assert!(!drawn.contains("<script>"));
        assert!(drawn.contains("&lt;script&gt;a"));
    }
}
