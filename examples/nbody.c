/*
 * nbody.c - a five-body model of the outer solar system.
 *
 * Usage: nbody [STEPS]          (default 5000000)
 *
 * The Sun and the four giant planets are integrated with Newtonian gravity.
 * Units: astronomical units (AU), years, solar masses, so the gravitational
 * constant is G = 4*pi^2 AU^3 / (Msun * yr^2).
 *
 * Initial positions and velocities are computed here from approximate J2000
 * Keplerian orbital elements of each planet (heliocentric two-body orbits),
 * then the Sun is given a small velocity so that the total momentum is zero.
 *
 * The integrator is a semi-implicit (symplectic) Euler step: first all
 * velocities are updated from the pairwise accelerations, then all positions
 * move with the new velocities. It conserves energy well over long runs, so
 * the two printed energies should agree to several digits.
 *
 * The program is a CPU benchmark: it uses only double-precision arithmetic
 * and sqrt, and no I/O apart from the two result lines.
 *
 * Build natively:  clang-14 -O2 -o nbody nbody.c -lm
 * Build for WASI:  scripts/build-wasm.sh examples examples/build
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define NBODIES 5

static const double PI = 3.141592653589793;
static const double DEG = 3.141592653589793 / 180.0;
#define GRAV (4.0 * PI * PI)     /* AU^3 / (Msun yr^2) */
#define DT 0.01                  /* time step in years */

struct body {
    double pos[3];   /* AU */
    double vel[3];   /* AU / year */
    double mass;     /* solar masses */
};

/* Approximate orbital elements (angles in degrees). */
struct elements {
    double mass;      /* in solar masses */
    double a;         /* semi-major axis, AU */
    double e;         /* eccentricity */
    double incl;      /* inclination to the ecliptic */
    double node;      /* longitude of ascending node */
    double peri;      /* longitude of perihelion */
    double mean_lon;  /* mean longitude at the epoch */
};

static const struct elements planets[NBODIES - 1] = {
    /*   mass            a        e       i       node     peri     L      */
    { 9.547919e-4,  5.2026, 0.0485, 1.303, 100.46,  14.33,  34.40 }, /* Jupiter */
    { 2.858860e-4,  9.5549, 0.0555, 2.489, 113.67,  93.06,  49.94 }, /* Saturn  */
    { 4.366244e-5, 19.2184, 0.0463, 0.773,  74.01, 173.01, 313.23 }, /* Uranus  */
    { 5.151389e-5, 30.1104, 0.0095, 1.770, 131.78,  48.12, 304.88 }, /* Neptune */
};

/* Solve Kepler's equation E - e sin E = M for the eccentric anomaly E. */
static double eccentric_anomaly(double M, double e)
{
    double E = M;
    for (int i = 0; i < 50; i++) {
        double f = E - e * sin(E) - M;
        double step = f / (1.0 - e * cos(E));
        E -= step;
        if (fabs(step) < 1e-15)
            break;
    }
    return E;
}

/* Convert orbital elements into a heliocentric position and velocity. */
static void from_elements(const struct elements *el, struct body *b)
{
    double mu = GRAV * (1.0 + el->mass);     /* Sun + planet */
    double i = el->incl * DEG;
    double node = el->node * DEG;
    double argp = (el->peri - el->node) * DEG;      /* argument of perihelion */
    double M = (el->mean_lon - el->peri) * DEG;     /* mean anomaly */

    double E = eccentric_anomaly(M, el->e);
    double root = sqrt(1.0 - el->e * el->e);
    double n = sqrt(mu / (el->a * el->a * el->a));  /* mean motion, rad/yr */
    double denom = 1.0 - el->e * cos(E);

    /* Position and velocity in the orbital plane (x towards perihelion). */
    double px = el->a * (cos(E) - el->e);
    double py = el->a * root * sin(E);
    double vx = -el->a * n * sin(E) / denom;
    double vy = el->a * n * root * cos(E) / denom;

    /* Rotate: by the argument of perihelion, the inclination, the node. */
    double cw = cos(argp), sw = sin(argp);
    double cn = cos(node), sn = sin(node);
    double ci = cos(i), si = sin(i);
    double r[3][2] = {
        { cn * cw - sn * sw * ci, -cn * sw - sn * cw * ci },
        { sn * cw + cn * sw * ci, -sn * sw + cn * cw * ci },
        { sw * si,                 cw * si                },
    };
    for (int k = 0; k < 3; k++) {
        b->pos[k] = r[k][0] * px + r[k][1] * py;
        b->vel[k] = r[k][0] * vx + r[k][1] * vy;
    }
    b->mass = el->mass;
}

static void setup(struct body *bodies)
{
    struct body *sun = &bodies[0];
    for (int k = 0; k < 3; k++)
        sun->pos[k] = sun->vel[k] = 0.0;
    sun->mass = 1.0;

    for (int p = 0; p < NBODIES - 1; p++)
        from_elements(&planets[p], &bodies[p + 1]);

    /* Give the Sun the opposite of the planets' momentum: the system's
     * centre of mass then stays still instead of drifting. */
    for (int k = 0; k < 3; k++) {
        double momentum = 0.0;
        for (int p = 1; p < NBODIES; p++)
            momentum += bodies[p].vel[k] * bodies[p].mass;
        sun->vel[k] = -momentum / sun->mass;
    }
}

/* Total energy: kinetic of every body plus potential of every pair. */
static double energy(const struct body *bodies)
{
    double total = 0.0;
    for (int i = 0; i < NBODIES; i++) {
        const struct body *a = &bodies[i];
        double v2 = a->vel[0] * a->vel[0] + a->vel[1] * a->vel[1] +
                    a->vel[2] * a->vel[2];
        total += 0.5 * a->mass * v2;
        for (int j = i + 1; j < NBODIES; j++) {
            const struct body *b = &bodies[j];
            double dx = a->pos[0] - b->pos[0];
            double dy = a->pos[1] - b->pos[1];
            double dz = a->pos[2] - b->pos[2];
            total -= GRAV * a->mass * b->mass / sqrt(dx * dx + dy * dy + dz * dz);
        }
    }
    return total;
}

/* One time step of the semi-implicit Euler integrator. */
static void step(struct body *bodies, double dt)
{
    for (int i = 0; i < NBODIES; i++) {
        struct body *a = &bodies[i];
        for (int j = i + 1; j < NBODIES; j++) {
            struct body *b = &bodies[j];
            double d[3] = {
                a->pos[0] - b->pos[0],
                a->pos[1] - b->pos[1],
                a->pos[2] - b->pos[2],
            };
            double r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
            /* G * dt / r^3, shared by both bodies of the pair */
            double s = GRAV * dt / (r2 * sqrt(r2));
            for (int k = 0; k < 3; k++) {
                a->vel[k] -= d[k] * b->mass * s;
                b->vel[k] += d[k] * a->mass * s;
            }
        }
    }
    for (int i = 0; i < NBODIES; i++)
        for (int k = 0; k < 3; k++)
            bodies[i].pos[k] += dt * bodies[i].vel[k];
}

int main(int argc, char **argv)
{
    long steps = (argc > 1) ? atol(argv[1]) : 5000000L;
    struct body bodies[NBODIES];

    setup(bodies);
    printf("%.9f\n", energy(bodies));
    for (long n = 0; n < steps; n++)
        step(bodies, DT);
    printf("%.9f\n", energy(bodies));
    return 0;
}
