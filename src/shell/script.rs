//! Text to statements: what `backfill sql` runs, in the order written.
//!
//! A script (the QUERY argument, a `-f` file, piped stdin, or what the
//! interactive shell has read) is a sequence of SQL statements ended by `;`
//! and of shell commands (`\d`, `\q`, ...) on lines of their own. Statements
//! are split where DataFusion's tokenizer (sqlparser's, as `DFParser` builds
//! it) sees a `;` token, so a `;` inside a string, a quoted identifier or a
//! comment never splits, and each piece is parsed by `DFParser`: what runs is
//! what `SessionContext::sql` would have parsed. The whole script is parsed
//! before anything runs, so a syntax error in its last statement stops it
//! before its first. Nothing here executes anything.

use datafusion::sql::parser::{DFParserBuilder, Statement};
use datafusion::sql::sqlparser::dialect::Dialect;
use datafusion::sql::sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

/// One SQL statement of a script, parsed.
#[derive(Debug, Clone)]
pub struct Piece {
    /// 1-based, counting the statements of the script.
    pub number: usize,
    /// The line of the script it starts on (1-based).
    pub line: u64,
    /// Its text as written, without the `;`.
    pub text: String,
    pub statement: Statement,
}

impl Piece {
    /// How a message names it: `statement 2 (line 3: SELECT ...)`.
    pub fn name(&self) -> String {
        name(self.number, self.line, &self.text)
    }
}

fn name(number: usize, line: u64, text: &str) -> String {
    format!("statement {number} (line {line}: {})", snippet(text))
}

/// What a script asks for, in order.
#[derive(Debug, Clone)]
pub enum Item {
    Sql(Box<Piece>),
    /// A shell command: its line, trimmed, e.g. `\d events`.
    Command {
        line: u64,
        text: String,
    },
}

/// Why a script cannot run (one line, naming the statement or the line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError(pub String);

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How far a buffer of typed lines has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing but whitespace and comments.
    Empty,
    /// A statement is open: no final `;` yet, or a string or block comment
    /// is not closed.
    Open,
    /// Ends with `;` (comments after it aside).
    Complete,
}

/// Where `text` stands: whether the shell should run it or read on.
pub fn progress(dialect: &dyn Dialect, text: &str) -> Progress {
    match Tokenizer::new(dialect, text).tokenize_with_location() {
        // An unterminated string or comment: more lines will close it.
        Err(_) => Progress::Open,
        Ok(tokens) => match tokens.iter().rev().find(|t| !is_blank(&t.token)) {
            None => Progress::Empty,
            Some(t) if t.token == Token::SemiColon => Progress::Complete,
            Some(_) => Progress::Open,
        },
    }
}

/// A shell command line (`\d events`, and `quit`/`exit` as `\q`), or `None`
/// for SQL. Only checked on lines that start a statement.
pub fn command(line: &str) -> Option<String> {
    let t = line.trim();
    if t.starts_with('\\') {
        return Some(t.to_string());
    }
    let word = t.trim_end_matches(';').trim();
    if word.eq_ignore_ascii_case("quit") || word.eq_ignore_ascii_case("exit") {
        return Some("\\q".into());
    }
    None
}

/// Parse a whole script into its items. `recursion_limit` is the session's
/// (`datafusion.sql_parser.recursion_limit`).
pub fn parse(
    dialect: &dyn Dialect,
    recursion_limit: usize,
    text: &str,
) -> Result<Vec<Item>, ScriptError> {
    // Windows editors start UTF-8 files with a byte order mark; the
    // tokenizer took it for a character of the first statement ("Expected:
    // an SQL statement, found: \u{feff}"). Editors hide it, so columns are
    // counted without it too.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parsed = Parsed::default();
    let mut buf = String::new();
    let mut buf_line = 1u64;
    // Whether `buf` holds a token that is not a comment: once it does, only a
    // line with a `;` can complete it, and the others need no tokenizing.
    let mut started = false;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i as u64 + 1;
        // Between statements, the mark of a second file joined on (`cat
        // a.sql b.sql | backfill sql`) is no more SQL than the first's.
        let line = match started {
            false => line.strip_prefix('\u{feff}').unwrap_or(line),
            true => line,
        };
        if !started {
            if let Some(cmd) = command(line) {
                buf.clear();
                let quit = cmd == "\\q";
                parsed.items.push(Item::Command {
                    line: lineno,
                    text: cmd,
                });
                if quit {
                    // As in psql: what follows `\q` is not read, and so
                    // cannot fail to parse (notes kept below it in a file).
                    return Ok(parsed.items);
                }
                continue;
            }
            if buf.trim().is_empty() {
                buf.clear();
                buf_line = lineno;
            }
        }
        buf.push_str(line);
        if !started || line.contains(';') {
            match progress(dialect, &buf) {
                Progress::Empty => started = false,
                Progress::Open => started = true,
                Progress::Complete => {
                    split(dialect, recursion_limit, &buf, buf_line, &mut parsed)?;
                    buf.clear();
                    started = false;
                }
            }
        }
    }
    if progress(dialect, &buf) != Progress::Empty {
        // The last statement needs no `;`; an unclosed string is an error
        // from the tokenizer here.
        split(dialect, recursion_limit, &buf, buf_line, &mut parsed)?;
    }
    Ok(parsed.items)
}

/// The items so far, and how many of them are statements.
#[derive(Default)]
struct Parsed {
    items: Vec<Item>,
    statements: usize,
}

/// Split `buf` (which starts on line `first_line` of the script) on its `;`
/// tokens and parse each statement.
fn split(
    dialect: &dyn Dialect,
    recursion_limit: usize,
    buf: &str,
    first_line: u64,
    parsed: &mut Parsed,
) -> Result<(), ScriptError> {
    let shift = first_line - 1;
    let tokens = Tokenizer::new(dialect, buf)
        .tokenize_with_location()
        .map_err(|e| {
            ScriptError(format!(
                "line {}, column {}: {}",
                e.location.line + shift,
                e.location.column,
                e.message
            ))
        })?;
    let mut group: Vec<TokenWithSpan> = vec![];
    let mut groups = vec![];
    for t in tokens {
        if t.token == Token::SemiColon {
            groups.push(std::mem::take(&mut group));
        } else {
            group.push(t);
        }
    }
    groups.push(group);
    for group in groups {
        let (Some(first), Some(last)) = (
            group.iter().position(|t| !is_blank(&t.token)),
            group.iter().rposition(|t| !is_blank(&t.token)),
        ) else {
            continue;
        };
        parsed.statements += 1;
        let number = parsed.statements;
        let (start, end) = (group[first].span.start, group[last].span.end);
        let text = buf[offset(buf, start)..offset(buf, end)].to_string();
        let line = start.line + shift;
        // Lines as the script numbers them, so the parser's own
        // "at Line: L, Column: C" points into the file.
        let tokens: Vec<TokenWithSpan> = group
            .into_iter()
            .map(|mut t| {
                t.span.start.line += shift;
                t.span.end.line += shift;
                t
            })
            .collect();
        let statements = DFParserBuilder::new(tokens)
            .with_dialect(dialect)
            .with_recursion_limit(recursion_limit)
            .build()
            .and_then(|mut p| p.parse_statements());
        let mut statements = statements.map_err(|e| {
            ScriptError(format!(
                "{}: {}",
                name(number, line, &text),
                parse_error_line(&e, recursion_limit)
            ))
        })?;
        // No `;` inside the group: the parser found one statement, or said
        // "Expected: end of statement" above.
        let statement = match (statements.pop_front(), statements.is_empty()) {
            (Some(s), true) => s,
            _ => {
                return Err(ScriptError(format!(
                    "{}: expected one statement",
                    name(number, line, &text)
                )));
            }
        };
        if let Some(what) = too_deep(&statement) {
            // Dropping a tree nested a million deep recurses as deep as it
            // nests, and would overflow the stack this refusal protects:
            // its memory is left to the process, which is about to stop
            // (or, in the shell, goes on without it).
            std::mem::forget(statement);
            return Err(ScriptError(format!(
                "{}: {what}",
                name(number, line, &text)
            )));
        }
        parsed.items.push(Item::Sql(Box::new(Piece {
            number,
            line,
            text,
            statement: time_zone(statement),
        })));
    }
    Ok(())
}

/// How deep a statement's expressions may nest, and how many set
/// operations (`UNION`, `EXCEPT`, `INTERSECT`) it may chain. The parser's
/// recursion limit (`datafusion.sql_parser.recursion_limit`) stops
/// parentheses and functions nested past it, but a chain of one operator
/// (`1+1+1+...`, `a = 1 OR a = 2 OR ...`, `SELECT 1 UNION ALL SELECT 1 ...`)
/// is parsed in a loop into a tree as deep as the chain is long, and the
/// planner, the optimizer and the evaluation of the tree then recurse that
/// deep: 10,000 terms overflowed the stack and killed the process. Past
/// this depth a statement is refused, with one line; below it the session
/// runs on stacks large enough for it (see `run` in the module).
pub const MAX_DEPTH: usize = 2000;

/// What is too deep in `statement`, if anything (see [`MAX_DEPTH`]).
fn too_deep(statement: &Statement) -> Option<String> {
    use datafusion::sql::parser::CopyToSource;
    use datafusion::sql::sqlparser::ast::Visit;
    let mut depth = Depth::default();
    let flow = match statement {
        Statement::Statement(s) => s.visit(&mut depth),
        Statement::CopyTo(c) => match &c.source {
            CopyToSource::Query(q) => q.visit(&mut depth),
            CopyToSource::Relation(_) => std::ops::ControlFlow::Continue(()),
        },
        Statement::Explain(e) => return too_deep(&e.statement),
        Statement::CreateExternalTable(_) | Statement::Reset(_) => {
            std::ops::ControlFlow::Continue(())
        }
    };
    match flow {
        std::ops::ControlFlow::Break(what) => Some(what),
        std::ops::ControlFlow::Continue(()) => None,
    }
}

/// Counts the nesting of expressions as the visitor walks down and up, and
/// stops at [`MAX_DEPTH`] (so that the walk itself recurses no deeper).
#[derive(Default)]
struct Depth {
    exprs: usize,
}

impl datafusion::sql::sqlparser::ast::Visitor for Depth {
    type Break = String;

    fn pre_visit_query(
        &mut self,
        query: &datafusion::sql::sqlparser::ast::Query,
    ) -> std::ops::ControlFlow<String> {
        use datafusion::sql::sqlparser::ast::SetExpr;
        // A chain of set operations nests to the left, and an INTERSECT
        // chain on the right of a UNION to the left again: walked with a
        // stack of its own, not by recursion, since it is what may be deep.
        // A parenthesised query inside is the visitor's next query.
        let mut todo = vec![(query.body.as_ref(), 0usize)];
        while let Some((body, depth)) = todo.pop() {
            if let SetExpr::SetOperation { left, right, .. } = body {
                if depth + 1 > MAX_DEPTH {
                    return std::ops::ControlFlow::Break(format!(
                        "more than {MAX_DEPTH} UNION, EXCEPT or INTERSECT in one chain is \
                         more than `backfill sql` plans: split the query (a view per part), \
                         or read the values from a file or a VALUES list"
                    ));
                }
                todo.push((left, depth + 1));
                todo.push((right, depth + 1));
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    fn pre_visit_expr(
        &mut self,
        _: &datafusion::sql::sqlparser::ast::Expr,
    ) -> std::ops::ControlFlow<String> {
        self.exprs += 1;
        if self.exprs > MAX_DEPTH {
            return std::ops::ControlFlow::Break(format!(
                "an expression nested more than {MAX_DEPTH} deep (a chain of that many \
                 operators, such as x = 1 OR x = 2 OR ...) is more than `backfill sql` plans: \
                 use x IN (1, 2, ...) for a list of values, or split the expression"
            ));
        }
        std::ops::ControlFlow::Continue(())
    }

    fn post_visit_expr(
        &mut self,
        _: &datafusion::sql::sqlparser::ast::Expr,
    ) -> std::ops::ControlFlow<String> {
        self.exprs -= 1;
        std::ops::ControlFlow::Continue(())
    }
}

/// `SET TIME ZONE x` (PostgreSQL's and the standard's spelling) as the `SET
/// timezone = x` DataFusion plans: DataFusion has no plan for it and
/// answered with a Rust debug dump of the statement. `SET TIME ZONE LOCAL`
/// and `DEFAULT` reset it, as in PostgreSQL.
fn time_zone(statement: Statement) -> Statement {
    use datafusion::sql::parser::ResetStatement;
    use datafusion::sql::sqlparser::ast::{Expr, Ident, ObjectName, Set, Statement as Sql};
    let Statement::Statement(sql) = statement else {
        return statement;
    };
    let Sql::Set(Set::SetTimeZone {
        local: false,
        value,
    }) = *sql
    else {
        return Statement::Statement(sql);
    };
    let variable = ObjectName::from(vec![Ident::new("timezone")]);
    match &value {
        Expr::Identifier(i)
            if i.quote_style.is_none()
                && (i.value.eq_ignore_ascii_case("local")
                    || i.value.eq_ignore_ascii_case("default")) =>
        {
            Statement::Reset(ResetStatement::Variable(variable))
        }
        _ => Statement::Statement(Box::new(Sql::Set(Set::SingleAssignment {
            scope: None,
            hivevar: false,
            variable,
            values: vec![value],
        }))),
    }
}

fn is_blank(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_))
}

/// The byte offset of a tokenizer location (1-based line and column, the
/// column counted in chars) in `text`.
fn offset(text: &str, loc: Location) -> usize {
    let mut line = 1;
    let mut start = 0;
    if loc.line > 1 {
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line += 1;
                if line == loc.line {
                    start = i + 1;
                    break;
                }
            }
        }
        if line < loc.line {
            return text.len();
        }
    }
    let col = loc.column.saturating_sub(1) as usize;
    text[start..]
        .char_indices()
        .nth(col)
        .map_or(text.len(), |(i, _)| start + i)
}

/// A parser error as one line: the parser's own words, without the Rust
/// debug wrapping (`SQL error: ParserError("...")`).
fn parse_error_line(e: &datafusion::error::DataFusionError, recursion_limit: usize) -> String {
    use datafusion::error::DataFusionError as D;
    use datafusion::sql::sqlparser::parser::ParserError;
    let s = match e.find_root() {
        // "recursion limit exceeded" alone does not say what recursed.
        D::SQL(pe, _) if matches!(**pe, ParserError::RecursionLimitExceeded) => format!(
            "{pe}: parentheses, subqueries or function calls nested more than \
             {recursion_limit} deep (datafusion.sql_parser.recursion_limit)"
        ),
        D::SQL(pe, _) => pe.to_string(),
        other => other.to_string(),
    };
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A statement's first words, whitespace folded, for messages.
pub fn snippet(text: &str) -> String {
    const MAX: usize = 60;
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if folded.chars().count() <= MAX {
        folded
    } else {
        let cut: String = folded.chars().take(MAX).collect();
        format!("{cut}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::sqlparser::dialect::GenericDialect;

    fn items(text: &str) -> Vec<Item> {
        parse(&GenericDialect {}, 50, text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn texts(text: &str) -> Vec<String> {
        items(text)
            .into_iter()
            .map(|i| match i {
                Item::Sql(p) => p.text,
                Item::Command { text, .. } => text,
            })
            .collect()
    }

    #[test]
    fn semicolons_in_strings_and_comments_do_not_split() {
        assert_eq!(
            texts("/* a; b */ SELECT ';' AS s; -- c; d\nSELECT \"x;y\" FROM t;\n\n"),
            vec!["SELECT ';' AS s", "SELECT \"x;y\" FROM t"]
        );
        assert_eq!(texts("SELECT 'it''s; fine'"), vec!["SELECT 'it''s; fine'"]);
        assert_eq!(texts(";;\n-- only a comment;\n"), Vec::<String>::new());
    }

    #[test]
    fn statements_keep_their_lines_and_numbers() {
        let got = items("SELECT 1;\n\n  SELECT\n  2; SELECT 3\n");
        let got: Vec<(usize, u64, String)> = got
            .into_iter()
            .map(|i| match i {
                Item::Sql(p) => (p.number, p.line, p.text),
                Item::Command { .. } => panic!("no commands here"),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 1, "SELECT 1".to_string()),
                (2, 3, "SELECT\n  2".to_string()),
                (3, 4, "SELECT 3".to_string()),
            ]
        );
    }

    #[test]
    fn commands_only_on_lines_of_their_own() {
        assert_eq!(
            texts("\\d\nSELECT 1;\n\\d events\nSELECT\n'\\d not a command'\n;\nquit\n"),
            vec![
                "\\d",
                "SELECT 1",
                "\\d events",
                "SELECT\n'\\d not a command'",
                "\\q"
            ]
        );
        // Inside an open block comment a backslash line is still comment.
        assert_eq!(texts("/*\n\\d\n*/ SELECT 1;"), vec!["SELECT 1"]);
    }

    #[test]
    fn nothing_after_quit_is_read() {
        assert_eq!(
            texts("SELECT 1;\n\\q\nthese are notes, not SQL;\n'unclosed"),
            vec!["SELECT 1", "\\q"]
        );
        assert_eq!(texts("SELECT 1;\nquit\nSELEC 2"), vec!["SELECT 1", "\\q"]);
    }

    #[test]
    fn non_ascii_text_is_cut_on_char_boundaries() {
        assert_eq!(
            texts("SELECT 'é;ü' AS x; SELECT 'ß'"),
            vec!["SELECT 'é;ü' AS x", "SELECT 'ß'"]
        );
    }

    #[test]
    fn a_syntax_error_names_the_statement_and_its_line() {
        let e = parse(&GenericDialect {}, 50, "SELECT 1;\nSELEC 2;\nSELECT 3;").unwrap_err();
        assert!(
            e.0.starts_with("statement 2 (line 2: SELEC 2): sql parser error:"),
            "{e}"
        );
        assert!(e.0.contains("Line: 2"), "{e}");
        let e = parse(&GenericDialect {}, 50, "SELECT 1;\nSELECT 'open").unwrap_err();
        assert!(e.0.starts_with("line 2, column 8: Unterminated"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_statement() {
        assert_eq!(texts("\u{feff}SELECT 1;\n\\d\n"), vec!["SELECT 1", "\\d"]);
        assert_eq!(texts("\u{feff}\\d events\n"), vec!["\\d events"]);
        // Files joined one after the other, each with its mark.
        assert_eq!(
            texts("\u{feff}SELECT 1;\n\u{feff}SELECT 2;\n\u{feff}\\d\n"),
            vec!["SELECT 1", "SELECT 2", "\\d"]
        );
        // Inside a string it is data.
        assert_eq!(texts("SELECT '\n\u{feff}x'"), vec!["SELECT '\n\u{feff}x'"]);
        let e = parse(&GenericDialect {}, 50, "\u{feff}SELEC 1").unwrap_err();
        assert!(e.0.contains("Column: 1"), "{e}");
    }

    #[test]
    fn chains_deeper_than_the_limit_are_refused_by_name() {
        let chain = |op: &str, n: usize| vec!["1"; n].join(op);
        // A chain of n terms nests n - 1 operators over its first term.
        assert_eq!(
            texts(&format!("SELECT {}", chain("+", MAX_DEPTH))),
            vec![format!("SELECT {}", chain("+", MAX_DEPTH))]
        );
        let e = parse(
            &GenericDialect {},
            50,
            &format!("SELECT 1;\nSELECT {}", chain("+", 10_000)),
        )
        .unwrap_err();
        assert!(
            e.0.starts_with("statement 2 (line 2: SELECT 1+1+")
                && e.0.contains(&format!("nested more than {MAX_DEPTH} deep")),
            "{e}"
        );
        let unions = vec!["SELECT 1"; MAX_DEPTH + 2].join(" UNION ALL ");
        let e = parse(&GenericDialect {}, 50, &unions).unwrap_err();
        assert!(e.0.contains("UNION, EXCEPT or INTERSECT"), "{e}");
        // INTERSECT binds tighter: its chain hangs on the UNION's right.
        let intersects = format!(
            "SELECT 1 UNION {}",
            vec!["SELECT 1"; MAX_DEPTH + 2].join(" INTERSECT ")
        );
        let e = parse(&GenericDialect {}, 50, &intersects).unwrap_err();
        assert!(e.0.contains("UNION, EXCEPT or INTERSECT"), "{e}");
        // Inside EXPLAIN and COPY too.
        let e = parse(
            &GenericDialect {},
            50,
            &format!("EXPLAIN SELECT {}", chain(" OR ", 10_000)),
        )
        .unwrap_err();
        assert!(e.0.contains("nested more than"), "{e}");
        let e = parse(
            &GenericDialect {},
            50,
            &format!("SELECT {}1{}", "(".repeat(60), ")".repeat(60)),
        )
        .unwrap_err();
        assert!(
            e.0.contains("recursion limit exceeded: parentheses, subqueries or function calls nested more than 50 deep"),
            "{e}"
        );
    }

    #[test]
    fn progress_of_typed_lines() {
        let d = GenericDialect {};
        assert_eq!(progress(&d, "  -- hi\n"), Progress::Empty);
        assert_eq!(progress(&d, "SELECT 1"), Progress::Open);
        assert_eq!(progress(&d, "SELECT ';"), Progress::Open);
        assert_eq!(progress(&d, "SELECT 1 /* ; */"), Progress::Open);
        assert_eq!(progress(&d, "SELECT 1; -- done"), Progress::Complete);
    }

    #[test]
    fn snippets_are_short_and_on_one_line() {
        assert_eq!(snippet("SELECT\n  *\nFROM t"), "SELECT * FROM t");
        let long = format!("SELECT {}", "x, ".repeat(50));
        assert!(snippet(&long).ends_with("...") && snippet(&long).len() < 70);
    }
}
