//! The money tables summed, and the invariant every fault test checks (docs/DESIGN.md#nothing-lost): one usage
//! row per turn, `ledger + unsettled compensations = usage cost`, keys' spend = ledger.

use std::time::Duration;

use diesel::sql_types::BigInt;
use diesel::{QueryableByName, sql_query};
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use turnpike::db::DbPool;

use super::TestDb;
use super::stack::block;

#[derive(QueryableByName, Debug)]
pub struct Sums {
    #[diesel(sql_type = BigInt)]
    pub usage_rows: i64,
    #[diesel(sql_type = BigInt)]
    pub distinct_keys: i64,
    #[diesel(sql_type = BigInt)]
    pub usage_cost: i64,
    #[diesel(sql_type = BigInt)]
    pub ledger: i64,
    #[diesel(sql_type = BigInt)]
    pub unsettled: i64,
    #[diesel(sql_type = BigInt)]
    pub spent: i64,
}

const SUMS: &str = "SELECT \
    (SELECT COUNT(*) FROM usage_logs) AS usage_rows, \
    (SELECT COUNT(*) FROM (SELECT DISTINCT request_id, api_key_id FROM usage_logs) d) AS distinct_keys, \
    (SELECT CAST(COALESCE(SUM(cost_nanousd), 0) AS BIGINT) FROM usage_logs) AS usage_cost, \
    (SELECT CAST(COALESCE(SUM(amount_nanousd), 0) AS BIGINT) FROM billing_ledger) AS ledger, \
    (SELECT CAST(COALESCE(SUM(amount_nanousd), 0) AS BIGINT) FROM billing_compensations WHERE status <> 'settled') AS unsettled, \
    (SELECT CAST(COALESCE(SUM(spent_nanousd), 0) AS BIGINT) FROM api_keys) AS spent";

pub fn sums(db: &TestDb) -> Sums {
    block(async {
        let pool = db.pool();
        query_sums(&pool).await
    })
}

pub async fn query_sums(pool: &DbPool) -> Sums {
    match pool {
        DbPool::Postgres(p) => {
            let mut c = p.get().await.unwrap();
            sql_query(SUMS).get_result(&mut c).await.unwrap()
        }
        DbPool::Sqlite(p) => {
            let mut c = p.get().await.unwrap();
            sql_query(SUMS).get_result(&mut c).await.unwrap()
        }
    }
}

pub fn exec(db: &TestDb, sql: &str) {
    block(async {
        match db.pool() {
            DbPool::Postgres(p) => p.get().await.unwrap().batch_execute(sql).await.unwrap(),
            DbPool::Sqlite(p) => p.get().await.unwrap().batch_execute(sql).await.unwrap(),
        }
    })
}

/// The reservation rows, by id: (request_id, amount).
pub fn reservation_rows(db: &TestDb) -> Vec<(String, i64)> {
    use diesel::prelude::*;
    use diesel_async::RunQueryDsl;
    use turnpike::db::schema::turn_reservations as r;
    let query = || {
        r::table
            .select((r::request_id, r::amount_nanousd))
            .order(r::request_id)
    };
    block(async {
        match db.pool() {
            turnpike::db::DbPool::Postgres(p) => query().load(&mut p.get().await.unwrap()).await,
            turnpike::db::DbPool::Sqlite(p) => query().load(&mut p.get().await.unwrap()).await,
        }
        .unwrap()
    })
}

pub fn wait_rows(db: &TestDb, n: i64) -> Sums {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = sums(db);
        if s.usage_rows >= n || std::time::Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn assert_invariant(s: &Sums) {
    assert_eq!(
        s.usage_rows, s.distinct_keys,
        "no duplicate usage rows: {s:?}"
    );
    assert_eq!(
        s.ledger + s.unsettled,
        s.usage_cost,
        "ledger + unsettled compensations = usage cost: {s:?}"
    );
    assert_eq!(s.spent, s.ledger, "keys' spend = ledger: {s:?}");
}
