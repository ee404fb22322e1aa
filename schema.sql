-- voxpoll schema, version 3. Embedded into the binary (src/store/sqlite.rs) and applied at start;
-- PRAGMA user_version tracks the applied version.

-- One row per realtime session.
CREATE TABLE IF NOT EXISTS sessions (
    id              TEXT PRIMARY KEY,          -- UUID v4, hyphenated
    user_id         TEXT,                      -- owner (NULL while auth is off)
    token_sha256    TEXT NOT NULL,             -- hex SHA-256 of the session_token (never the token)
    provider        TEXT NOT NULL,             -- provider name, e.g. "embedded"
    engine          TEXT NOT NULL,             -- engine model type, e.g. "16k_zh"
    options_json    TEXT NOT NULL,             -- the creation options as given
    status          TEXT NOT NULL,             -- open | finishing | finished | cancelled | expired | failed
    epoch           INTEGER NOT NULL,          -- changes whenever in-memory state may have been lost
    acked_seq       INTEGER,                   -- highest contiguous chunk seq received (NULL: none)
    audio_ms        INTEGER NOT NULL DEFAULT 0,-- audio received so far, ms at 16 kHz
    transcript      TEXT NOT NULL DEFAULT '',  -- finals joined in sentence order
    end_reason      TEXT,                      -- finished | cancelled | expired | failed
    created_at_ms   INTEGER NOT NULL,          -- unix ms
    updated_at_ms   INTEGER NOT NULL,
    ended_at_ms     INTEGER
);
CREATE INDEX IF NOT EXISTS sessions_user_created ON sessions (user_id, created_at_ms);

-- Every final sentence and terminal event of a session, in event-log order (`seq`).
CREATE TABLE IF NOT EXISTS session_events (
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,              -- the event's seq in the session's log
    event_json  TEXT NOT NULL,                 -- the event exactly as served by /events
    PRIMARY KEY (session_id, seq)
);

-- Version 2: one-shot recognitions (`POST /v1/recognize`), listed in history beside sessions.
CREATE TABLE IF NOT EXISTS recognitions (
    id              TEXT PRIMARY KEY,          -- UUID v4, hyphenated
    user_id         TEXT,                      -- owner (NULL while auth is off)
    provider        TEXT NOT NULL,
    engine          TEXT NOT NULL,
    text            TEXT NOT NULL,             -- sentences joined
    sentences_json  TEXT NOT NULL,             -- [{sentence, text, start_ms, end_ms, words?}]
    duration_ms     INTEGER NOT NULL,          -- audio duration
    created_at_ms   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS recognitions_user_created ON recognitions (user_id, created_at_ms);
CREATE INDEX IF NOT EXISTS sessions_ended ON sessions (ended_at_ms);

-- Version 3: every accepted audio chunk of a session still running, written before the upload is
-- answered (group commit), so a restarted process resumes the session. Deleted when it ends.
-- Since 2026-12-06 chunks go to a file per running session beside the database
-- (src/store/chunk_files.rs); rows left by an older version are still read when their session
-- resumes.
CREATE TABLE IF NOT EXISTS session_chunks (
    session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,              -- the chunk's seq
    last        INTEGER NOT NULL,              -- 1 when uploaded with last=1
    data        BLOB NOT NULL,                 -- the chunk's bytes as uploaded
    PRIMARY KEY (session_id, seq)
);

-- Version 3: event seqs handed out up to here (partials are not stored, but a client may hold a
-- cursor past the last stored event); a resumed session continues above it.
ALTER TABLE sessions ADD COLUMN seq_reserved INTEGER NOT NULL DEFAULT 0;
