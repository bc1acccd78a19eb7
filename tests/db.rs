//! Every query function, on SQLite and (when `TURNPIKE_TEST_PG_URL` is set) PostgreSQL.

mod common;

use common::{TestDb, on_each_backend, turn_record};
use turnpike::auth::{self, AuthError, KeyRequest};
use turnpike::db::models::NewCompensation;
use turnpike::db::{migrate, now, queries};

#[actix_web::test]
async fn migrations_are_idempotent_and_complete() {
    for db in TestDb::all().await {
        let pool = db.pool();
        assert!(
            !migrate::pending(&pool).await.unwrap().is_empty(),
            "{}",
            db.backend
        );
        let first = migrate::run_pending(&pool).await.unwrap();
        assert_eq!(
            first,
            vec![
                "20261122000001".to_string(),
                "20261127000001".to_string(),
                "20261128000001".to_string(),
                "20261129000001".to_string(),
                "20261206000001".to_string(),
                "20261206000002".to_string(),
                "20261207000001".to_string(),
                "20261207000002".to_string(),
                "20261207000003".to_string()
            ],
            "{}",
            db.backend
        );
        let second = migrate::run_pending(&pool).await.unwrap();
        assert!(
            second.is_empty(),
            "{}: second run applied {second:?}",
            db.backend
        );
        assert!(migrate::pending(&pool).await.unwrap().is_empty());
        queries::health::ping(&pool).await.unwrap();
        drop(pool);
        db.cleanup().await;
    }
}

#[actix_web::test]
async fn users_create_list_balance_enable() {
    on_each_backend(|pool| async move {
        let alice = queries::users::create(&pool, "alice", Some(5_000_000_000))
            .await
            .unwrap();
        assert!(alice.enabled);
        assert_eq!(alice.balance_nanousd, Some(5_000_000_000));
        let bob = queries::users::create(&pool, "bob", None).await.unwrap();
        assert!(bob.id > alice.id);
        let dup = queries::users::create(&pool, "alice", None)
            .await
            .unwrap_err();
        assert!(dup.is_unique_violation(), "{dup}");

        let names: Vec<String> = queries::users::list(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(names, ["alice", "bob"]);

        assert!(
            queries::users::set_balance(&pool, "bob", Some(7))
                .await
                .unwrap()
        );
        assert!(
            !queries::users::set_balance(&pool, "nobody", Some(7))
                .await
                .unwrap()
        );
        let bob = queries::users::by_name(&pool, "bob")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(bob.balance_nanousd, Some(7));
        assert!(
            queries::users::set_balance(&pool, "bob", None)
                .await
                .unwrap()
        );
        assert!(
            queries::users::set_enabled(&pool, "bob", false)
                .await
                .unwrap()
        );
        let bob = queries::users::by_name(&pool, "bob")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((bob.balance_nanousd, bob.enabled), (None, false));
        assert!(
            !queries::users::set_enabled(&pool, "nobody", true)
                .await
                .unwrap()
        );
        assert!(
            queries::users::by_name(&pool, "nobody")
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

#[actix_web::test]
async fn keys_store_only_hashes_and_authenticate() {
    on_each_backend(|pool| async move {
        let user = queries::users::create(&pool, "carol", None).await.unwrap();
        let req = KeyRequest {
            label: Some("laptop".into()),
            quota_nanousd: Some(1_000),
            max_sessions: Some(2),
            max_concurrent_turns: Some(1),
            allowed_models: Some(vec!["gpt-a".into(), " gpt-b ".into(), "".into()]),
            allowed_service_tiers: Some(vec!["standard".into(), "flex".into()]),
        };
        let (key, row) = auth::create_key(&pool, user.id, &req).await.unwrap();
        assert_eq!(row.key_hash, auth::hash_key(&key));
        assert_ne!(row.key_hash, key);
        // The allow-lists are stored trimmed and read back as the key's limits.
        assert_eq!(row.allowed_models.as_deref(), Some("gpt-a,gpt-b"));
        assert_eq!(row.allowed_service_tiers.as_deref(), Some("standard,flex"));
        assert!(auth::check_request(&row, "gpt-b", Some("flex")).is_ok());
        assert!(auth::check_request(&row, "gpt-b", Some("auto")).is_ok());
        assert!(matches!(
            auth::check_request(&row, "gpt-c", None),
            Err(auth::AuthError::ModelNotAllowed(_))
        ));
        assert!(matches!(
            auth::check_request(&row, "gpt-a", Some("priority")),
            Err(auth::AuthError::ServiceTierNotAllowed(_))
        ));
        assert!(key.starts_with(&row.key_prefix));
        assert!(
            row.key_prefix.len() < key.len() / 2,
            "prefix must not reveal the key"
        );

        let p = auth::authenticate(&pool, &key).await.unwrap();
        assert_eq!(
            (p.key_id, p.user_id, p.user_name.as_str()),
            (row.id, user.id, "carol")
        );
        assert_eq!((p.max_sessions, p.max_concurrent_turns), (Some(2), Some(1)));

        let (found, owner) = queries::keys::by_id(&pool, row.id).await.unwrap().unwrap();
        assert_eq!((found.id, owner.id), (row.id, user.id));
        assert!(
            queries::keys::by_id(&pool, row.id + 100)
                .await
                .unwrap()
                .is_none()
        );

        // A near miss is not a key.
        let mut wrong = key.clone();
        wrong.pop();
        wrong.push('x');
        assert!(matches!(
            auth::authenticate(&pool, &wrong).await,
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            auth::authenticate(&pool, "").await,
            Err(AuthError::Missing)
        ));

        let other = queries::users::create(&pool, "dave", None).await.unwrap();
        auth::create_key(&pool, other.id, &KeyRequest::default())
            .await
            .unwrap();
        assert_eq!(queries::keys::list(&pool, None).await.unwrap().len(), 2);
        let carols = queries::keys::list(&pool, Some("carol")).await.unwrap();
        assert_eq!(carols.len(), 1);
        assert_eq!(carols[0].1, "carol");

        // A disabled owner refuses the key; enabling restores it.
        queries::users::set_enabled(&pool, "carol", false)
            .await
            .unwrap();
        assert!(matches!(
            auth::authenticate(&pool, &key).await,
            Err(AuthError::UserDisabled)
        ));
        queries::users::set_enabled(&pool, "carol", true)
            .await
            .unwrap();

        assert!(queries::keys::revoke(&pool, row.id).await.unwrap());
        assert!(
            !queries::keys::revoke(&pool, row.id).await.unwrap(),
            "second revoke"
        );
        assert!(matches!(
            auth::authenticate(&pool, &key).await,
            Err(AuthError::Revoked)
        ));
        assert!(
            queries::keys::list(&pool, Some("carol")).await.unwrap()[0]
                .0
                .revoked_at
                .is_some()
        );
    })
    .await;
}

#[actix_web::test]
async fn balance_exhausted_user_is_refused() {
    on_each_backend(|pool| async move {
        let user = queries::users::create(&pool, "erin", Some(0))
            .await
            .unwrap();
        let (key, _) = auth::create_key(&pool, user.id, &KeyRequest::default())
            .await
            .unwrap();
        assert!(matches!(
            auth::authenticate(&pool, &key).await,
            Err(AuthError::BalanceExhausted)
        ));
        queries::users::set_balance(&pool, "erin", Some(1))
            .await
            .unwrap();
        auth::authenticate(&pool, &key).await.unwrap();
    })
    .await;
}

#[actix_web::test]
async fn compensation_backlog_view_answers() {
    on_each_backend(|pool| async move {
        assert!(
            queries::billing::compensation_backlog(&pool)
                .await
                .unwrap()
                .is_empty()
        );
        let user = queries::users::create(&pool, "fay", None).await.unwrap();
        let (_, key) = auth::create_key(&pool, user.id, &KeyRequest::default())
            .await
            .unwrap();
        let row = |request_id: &'static str, amount: i64, status: &'static str| NewCompensation {
            request_id,
            api_key_id: key.id,
            user_id: user.id,
            amount_nanousd: amount,
            status,
            next_attempt_at: Some(now()),
            last_error: Some("serialization failure"),
            created_at: now() - chrono::Duration::seconds(120),
            updated_at: now(),
        };
        assert!(
            queries::billing::insert_compensation(&pool, &row("resp_1", 100, "pending"))
                .await
                .unwrap()
        );
        assert!(
            queries::billing::insert_compensation(&pool, &row("resp_2", 250, "pending"))
                .await
                .unwrap()
        );
        assert!(
            queries::billing::insert_compensation(&pool, &row("resp_3", 7, "dead"))
                .await
                .unwrap()
        );
        // The same (request_id, api_key_id) again is ignored, not doubled.
        assert!(
            !queries::billing::insert_compensation(&pool, &row("resp_1", 100, "pending"))
                .await
                .unwrap()
        );

        let backlog = queries::billing::compensation_backlog(&pool).await.unwrap();
        assert_eq!(backlog.len(), 2);
        let dead = &backlog[0];
        let pending = &backlog[1];
        assert_eq!(
            (dead.status.as_str(), dead.rows_count, dead.amount_nanousd),
            ("dead", 1, 7)
        );
        assert_eq!(
            (
                pending.status.as_str(),
                pending.rows_count,
                pending.amount_nanousd
            ),
            ("pending", 2, 350)
        );
        assert!(
            (100..=3600).contains(&pending.oldest_age_s),
            "oldest pending is ~120 s old, view says {}",
            pending.oldest_age_s
        );
        assert_eq!(pending.max_attempts, Some(0));
    })
    .await;
}

#[actix_web::test]
async fn batches_bill_once_and_count_mismatched_replays() {
    on_each_backend(|pool| async move {
        let user = queries::users::create(&pool, "gil", Some(1_000))
            .await
            .unwrap();
        let (_, k1) = auth::create_key(&pool, user.id, &KeyRequest::default())
            .await
            .unwrap();
        let (_, k2) = auth::create_key(&pool, user.id, &KeyRequest::default())
            .await
            .unwrap();
        let batch = vec![
            turn_record("resp_a", k1.id, user.id, 100),
            turn_record("resp_b", k1.id, user.id, 50),
            turn_record("resp_a", k2.id, user.id, 7), // same response id, other key: its own row
            turn_record("resp_w", k2.id, user.id, 0), // free (reported zero): row, no debit
        ];
        let out = queries::billing::record_batch(&pool, &batch).await.unwrap();
        assert_eq!((out.usage_rows, out.debits, out.mismatched), (4, 3, 0));
        // A replay changes nothing.
        let again = queries::billing::record_batch(&pool, &batch).await.unwrap();
        assert_eq!(
            (again.usage_rows, again.debits, again.mismatched),
            (0, 0, 0)
        );
        // A replay with a different payload is counted, not applied.
        let odd =
            queries::billing::record_batch(&pool, &[turn_record("resp_b", k1.id, user.id, 999)])
                .await
                .unwrap();
        assert_eq!((odd.usage_rows, odd.debits, odd.mismatched), (0, 0, 1));
        let (key1, owner) = queries::keys::by_id(&pool, k1.id).await.unwrap().unwrap();
        let (key2, _) = queries::keys::by_id(&pool, k2.id).await.unwrap().unwrap();
        assert_eq!((key1.spent_nanousd, key2.spent_nanousd), (150, 7));
        assert_eq!(owner.balance_nanousd, Some(1_000 - 157));
        let rows = queries::usage::by_key(&pool, k1.id).await.unwrap();
        assert_eq!(rows.len(), 2);
        // The tier billed and the cache writes' lifetimes are columns of the row.
        assert_eq!(rows[0].service_tier, "priority");
        assert_eq!(
            (
                rows[0].cache_write_tokens,
                rows[0].cache_write_30m_tokens,
                rows[0].cache_write_12h_tokens
            ),
            (5, 2, 3)
        );
    })
    .await;
}

/// PostgreSQL connections carry `statement_timeout` from `database.statement_timeout_ms`.
#[actix_web::test]
async fn postgres_statement_timeout_is_set() {
    use diesel::QueryableByName;
    use diesel::sql_types::Text;
    #[derive(QueryableByName)]
    struct Setting {
        #[diesel(sql_type = Text)]
        statement_timeout: String,
    }
    for db in TestDb::all().await {
        if db.backend != "postgres" {
            continue;
        }
        let mut settings = db.settings();
        settings.statement_timeout_ms = 1500;
        let pool = turnpike::db::DbPool::connect(&settings).unwrap();
        let turnpike::db::DbPool::Postgres(p) = &pool else {
            unreachable!()
        };
        let mut c = p.get().await.unwrap();
        let s: Setting = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query("SHOW statement_timeout"),
            &mut c,
        )
        .await
        .unwrap();
        assert_eq!(s.statement_timeout, "1500ms");
        drop(c);
        drop(pool);
        db.cleanup().await;
    }
}

/// A test that panics still drops its PostgreSQL database (no `tp_t_*` left behind).
#[test]
fn a_failing_test_drops_its_database() {
    let Ok(base) = std::env::var(common::PG_ENV) else {
        return;
    };
    let b = base.clone();
    let outcome = std::thread::spawn(move || {
        let db = common::stack::block(TestDb::postgres(&b));
        let name = db.url.rsplit('/').next().unwrap().to_string();
        std::panic::panic_any(name);
    })
    .join();
    let name = *outcome.unwrap_err().downcast::<String>().unwrap();
    let left = common::stack::block(async {
        use diesel::QueryableByName;
        use diesel::sql_types::BigInt;
        #[derive(QueryableByName)]
        struct N {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        use diesel_async::AsyncConnection;
        let mut c = diesel_async::AsyncPgConnection::establish(&base)
            .await
            .unwrap();
        let r: N = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query(format!(
                "SELECT count(*) AS n FROM pg_database WHERE datname = '{name}'"
            )),
            &mut c,
        )
        .await
        .unwrap();
        r.n
    });
    assert_eq!(left, 0, "{name} was dropped");
}

/// A compensation whose turn's usage row is missing (a DBA's delete, a partial restore) is never
/// settled: no debit without its usage row (the money invariant); with the row back, it settles.
#[actix_web::test]
async fn a_compensation_without_its_usage_row_is_not_settled() {
    on_each_backend(|pool| async move {
        let user = queries::users::create(&pool, "gus", None).await.unwrap();
        let (_, key) = auth::create_key(&pool, user.id, &KeyRequest::default())
            .await
            .unwrap();
        let comp = NewCompensation {
            request_id: "turn_orphan",
            api_key_id: key.id,
            user_id: user.id,
            amount_nanousd: 500,
            status: "pending",
            next_attempt_at: Some(now()),
            last_error: Some("serialization failure"),
            created_at: now(),
            updated_at: now(),
        };
        assert!(
            queries::billing::insert_compensation(&pool, &comp)
                .await
                .unwrap()
        );
        let due = queries::billing::due_compensations(&pool, 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1);
        let refused = queries::billing::settle_compensation(&pool, &due[0])
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("usage row"), "{refused}");
        let (k, _) = queries::keys::by_id(&pool, key.id).await.unwrap().unwrap();
        assert_eq!(k.spent_nanousd, 0, "not debited");
        // The usage row (as its batch writes it), then the retry settles.
        let mut record = turn_record("turn_orphan", key.id, user.id, 500);
        record.usage = turnpike::protocol::usage::Usage::default();
        let written =
            queries::billing::record_with_compensation(&pool, &record, "lost debit").await;
        assert!(written.is_ok(), "{written:?}");
        queries::billing::settle_compensation(&pool, &due[0])
            .await
            .unwrap();
        let (k, _) = queries::keys::by_id(&pool, key.id).await.unwrap().unwrap();
        assert_eq!(k.spent_nanousd, 500);
    })
    .await;
}

#[derive(diesel::QueryableByName)]
struct Tls {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    ssl: bool,
}

/// Whether the pool's connection to `url` is encrypted, as the server sees it; or why it
/// could not connect.
async fn encrypted(url: &str) -> Result<bool, String> {
    use diesel_async::RunQueryDsl;
    let settings = turnpike::config::DatabaseSettings {
        url: url.to_string(),
        connect_timeout_ms: 5_000,
        ..Default::default()
    };
    let pool = turnpike::db::DbPool::connect(&settings).map_err(|e| e.to_string())?;
    let turnpike::db::DbPool::Postgres(pool) = pool else {
        unreachable!("a PostgreSQL URL")
    };
    let mut conn = pool
        .get()
        .await
        .map_err(|e| turnpike::db::DbError::from(e).to_string())?;
    let row: Tls = diesel::sql_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .get_result(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.ssl)
}

/// libpq's `sslmode` and `sslrootcert` against the local server (docs/DESIGN.md#database-tls):
/// encrypted unless disabled, the certificate checked as the mode says.
#[actix_web::test]
async fn postgres_over_tls_as_sslmode_says() {
    let Ok(base) = std::env::var(common::PG_ENV) else {
        return;
    };
    let db = TestDb::postgres(&base).await;
    let with = |params: &str| format!("{}?{params}", db.url);
    assert_eq!(encrypted(&with("sslmode=disable")).await, Ok(false));
    let server_ssl = {
        use diesel_async::RunQueryDsl;
        #[derive(diesel::QueryableByName)]
        struct Show {
            #[diesel(sql_type = diesel::sql_types::Text)]
            v: String,
        }
        let turnpike::db::DbPool::Postgres(pool) = db.pool() else {
            unreachable!()
        };
        let mut conn = pool.get().await.unwrap();
        let ssl: Show = diesel::sql_query("SELECT current_setting('ssl') AS v")
            .get_result(&mut *conn)
            .await
            .unwrap();
        let cert: Show = diesel::sql_query("SELECT current_setting('ssl_cert_file') AS v")
            .get_result(&mut *conn)
            .await
            .unwrap();
        (ssl.v == "on").then_some(cert.v)
    };
    let Some(cert) = server_ssl else {
        // A server without TLS: `require` refuses to go on in plain text, `prefer` does.
        let e = encrypted(&with("sslmode=require")).await.unwrap_err();
        assert!(e.contains("TLS") || e.contains("SSL"), "{e}");
        assert_eq!(encrypted(&db.url).await, Ok(false));
        db.cleanup().await;
        return;
    };
    // Without sslmode, as libpq: encrypted when the server offers it.
    assert_eq!(encrypted(&db.url).await, Ok(true));
    assert_eq!(encrypted(&with("sslmode=require")).await, Ok(true));
    // Its certificate is not signed by a public root: verify-ca without roots refuses.
    let e = encrypted(&with("sslmode=verify-ca")).await.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");
    if std::fs::read(&cert).is_ok() {
        // The server's own (self-signed) certificate as the root.
        let rooted = |mode: &str| with(&format!("sslmode={mode}&sslrootcert={cert}"));
        assert_eq!(encrypted(&rooted("verify-ca")).await, Ok(true));
        assert_eq!(encrypted(&rooted("require")).await, Ok(true));
        if db.url.contains("@127.0.0.1:") {
            // verify-full checks the name too: the certificate names localhost, not 127.0.0.1.
            let e = encrypted(&rooted("verify-full")).await.unwrap_err();
            assert!(e.contains("not valid for name \"127.0.0.1\""), "{e}");
            let by_name = rooted("verify-full").replace("@127.0.0.1:", "@localhost:");
            let named = encrypted(&by_name).await;
            assert!(
                named == Ok(true)
                    || named
                        .as_ref()
                        .is_err_and(|e| e.contains("not valid for name")),
                "{named:?}"
            );
        }
    }
    db.cleanup().await;
}
